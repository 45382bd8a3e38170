"""The one place for configuration: typed dataclasses, loaded from YAML, overridden by `key=value`.

Every job takes one of these; defaults live here and nowhere else. Nested fields are addressed
with dots on the command line, e.g. `brainseg ingest SRC --out DST s3.endpoint_url=http://...`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from brainseg_ray.storage import S3Options

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that does not fit its field; the message names the field."""


# GPU settings, the same in every job that runs a model (train, evaluate, segment, serve):
#   use_gpu      None: GPUs when the cluster has one; false: never; true: required (a cluster
#                without GPUs leaves the job waiting for one, as an autoscaler would add)
#   gpus_per_*   with a GPU, the share of one each actor (replica) holds; a fraction shares a
#                GPU. Training takes one GPU per worker (DDP ranks cannot share one).
# runtime.gpus_per_actor turns them into Ray's num_gpus.


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS, a running local cluster, or a new local one
    num_cpus: int | None = None  # only when this process starts a local instance
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls (it
    # warns every few seconds without it) and `ray list`/`ray status` use.
    include_dashboard: bool = True
    # Workers' and actors' output (Ray Train's per-epoch lines among it) in this terminal
    log_to_driver: bool = True


@dataclass
class IngestConfig:
    source: str = ""  # folder, s3:// prefix, archive, or a glob of archives
    out: str = ""  # local folder or s3:// prefix for the Parquet dataset
    masks: str = "auto"  # auto | required | optional (see catalog.build_catalog)
    slices_per_task: int = 128  # large enough that Ray scheduling is a small share of a task
    # A tar archive is streamed from its start by each task that reads it, so its slices are cut
    # into at most this many tasks to bound the re-reading.
    tasks_per_archive: int = 8
    parquet_compression: str = "zstd"  # Parquet codec
    parquet_compression_level: int | None = 1  # zstd level 1: near level 3's size at twice the speed
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class TrainConfig:
    data: str = ""  # ingested dataset (folder or s3:// prefix)
    out: str = ""  # run folder: checkpoints/, model/, history.csv/json, curves.png, split.json
    # model
    model: str = "unet-resnet34"  # a registry name (see `brainseg models`)
    encoder_depth: int = 5  # smp models only
    base_filters: int = 32  # filters of the first level, doubling per level (plain unet only)
    encoder_weights_path: str | None = None  # local encoder state_dict; nothing is downloaded
    # default | imagenet | none; default: the installed ImageNet weights where they fit the encoder
    # (unet-efficientnet-lite0/1/2), else random
    encoder_weights: str = "default"
    image_size: int = 256  # slices are resized to this for the model (smaller: faster search)
    # Train on random crops of this side cut at native resolution (image_size stays the slice's);
    # validation and inference see whole slices. None: whole slices.
    crop_size: int | None = None
    foreground_fraction: float = 0.33  # share of crops centred near tumour pixels (nnU-Net's 0.33)
    # A model artifact (or `reference`) whose weights start this run: fine-tuning, or a second stage
    # at a larger image_size. Its model settings must match; it is ignored when resuming.
    init_from: str | None = None
    # patients: a split file from `brainseg split`, else a fold, else a drawn split
    split_file: str | None = None
    fold: int | None = None  # validate on this fold of `folds`, train on the others
    folds: int = 5  # folds drawn here for `fold` when there is no split_file
    val_fraction: float = 0.2  # neither split_file nor fold: this share of patients validates
    seed: int = 0  # draws the folds or split, and shuffles the training slices
    # optimisation
    epochs: int = 30
    # Optimizer steps in all, a compute budget (per worker; samples = steps x batch_size x workers);
    # None: `epochs` passes over the training slices
    steps: int | None = None
    eval_every_steps: int = 250  # with steps: validate and checkpoint this often (a history row each)
    schedule: str = "one_cycle"  # one_cycle | cosine (linear warm-up, then cosine down to lr/1000)
    warmup_fraction: float | None = None  # share of the steps warming up; None: 0.3 one-cycle, 0.05 cosine
    batch_size: int = 16  # per worker
    lr: float = 1e-3  # peak learning rate (see `brainseg lr-find`)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    loss: str = "bce_dice"  # bce_dice | dice | focal | bce
    augmentation: str = "light"  # none | light | strong | natural | scanner (see data/augment.py)
    # dataset: per channel, the training data's mean and std; slice: each slice's channels first
    # brought to a common 99th percentile (models/inputs.py), as every consumer of the model does
    normalisation: str = "dataset"
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: AMP on GPU, bf16 on CPUs that have it)
    channels_last: bool = True
    threshold: float = 0.5  # decision threshold recorded in the artifact
    early_stopping_patience: int = 8  # epochs (step rounds) without a better validation per-patient Dice
    min_delta: float = 0.0
    keep_checkpoints: int = 2  # best N by validation per-patient Dice (the latest is kept too)
    resume: bool = True  # continue from the latest checkpoint under `out`
    half_weights: bool = False  # store the final model in float16 (half the size)
    # resources
    num_workers: int = 1
    use_gpu: bool | None = None  # a GPU per worker; see GPU settings above
    cpus_per_worker: float | None = None  # None: the cluster's CPUs shared out over the workers
    max_failures: int = 0  # worker failures Ray Train recovers from within one run
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class LrFindConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    start_lr: float = 1e-7  # the learning rate grows exponentially from this ...
    end_lr: float = 1.0  # ... to this
    steps: int = 100  # one optimizer step per learning rate
    out: str = ""  # folder for lr_find.png and lr_find.json (default: train.out)


@dataclass
class EvaluateConfig:
    models: list[str] = field(default_factory=list)  # artifact folders or s3:// URIs
    data: str = ""  # ingested dataset
    out: str = ""  # report folder
    split_file: str | None = None  # from `brainseg split`, or a training run's split.json
    split: str = "all"  # all, or a split name in split_file (train | val | test)
    fold: int | None = None  # or: the patients of this fold of split_file's folds
    threshold: float | None = None  # None: each model's own threshold
    # Post-processing as the Segmenter does it (None: each model's own choice); with
    # largest_component_3d, each actor call gets whole patients.
    min_component_px: int | None = None  # drop 2-D lesion components smaller than this
    min_component_peak: float | None = None  # drop 2-D components whose highest probability is below this
    largest_component_3d: bool | None = None  # per patient, keep the largest 3-D component only
    keep_3d_fraction: float | None = None  # with it, keep 3-D components of at least this share of the largest
    tta: bool | None = None  # average the predictions of the slice and its flips
    thresholds: list[float] = field(default_factory=list)  # also score these thresholds: a sweep table
    batch_size: int = 16  # slices per actor call (the forward pass takes the device's own size)
    concurrency: int = 1  # predictor actors per model
    cpus_per_actor: float = 1.0  # at most what leaves one CPU to the read stage
    use_gpu: bool | None = None  # see GPU settings above
    gpus_per_actor: float = 1.0
    precision: str = "auto"
    backend: str = "auto"  # auto | torch | onnxruntime, as the Segmenter's
    worst_slices: int = 12
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class SegmenterConfig:
    """How one Segmenter turns slices into masks and findings (the batch job and Serve alike)."""

    model: str = "reference"  # model artifact folder or s3:// URI; `reference`: the shipped model
    threshold: float | None = None  # None: the artifact's own threshold
    # Post-processing; None: the artifact's own choice (model.json "postprocess"), else off.
    min_component_px: int | None = None  # drop 2-D lesion components smaller than this
    min_component_peak: float | None = None  # drop 2-D components whose highest probability is below this
    largest_component_3d: bool | None = None  # per patient, keep the largest 3-D component only
    keep_3d_fraction: float | None = None  # with it, keep 3-D components of at least this share of the largest
    tta: bool | None = None  # average the predictions of the slice and its flips
    pixel_spacing_mm: float = 1.0  # for the areas in mm^2
    slice_thickness_mm: float = 1.0  # with it, for the volumes in mm^3
    overlay_style: str = "outline"  # outline | tint
    batch_size: int | None = None  # slices per forward pass; None: 16 on a GPU, 2 on a CPU
    precision: str = "auto"
    # auto: ONNX Runtime (float32) on a CPU unless precision is bf16 by name, torch on a GPU
    backend: str = "auto"
    channels_last: bool = True
    threads: int | None = None  # CPU threads of the forward pass (Ray sets 1 in its workers)


@dataclass
class SegmentJobConfig:
    input: str = ""  # folder, s3:// prefix, archive, or a glob of archives
    output: str = ""  # folder or s3:// prefix; rerun the same command to continue
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    slices_per_task: int = 64  # whole patients per task, up to about this many slices
    concurrency: int = 1  # Segmenter actors
    # None: the cluster's CPUs shared out over the actors (tasks read their own files, so no
    # separate read stage needs CPUs left over); also the actors' torch threads
    cpus_per_actor: float | None = None
    use_gpu: bool | None = None  # see GPU settings above
    gpus_per_actor: float = 1.0
    write_overlays: bool = True
    shard: str | None = None  # "i/n": run every n-th task only (independent submissions)
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class SynthConfig:
    out: str = ""  # writes OUT/kaggle_3m
    patients: int = 10
    seed: int = 0  # the same seed writes the same files
    min_slices: int = 20  # slices per patient: from min_slices to max_slices
    max_slices: int = 30
    lesion_fraction: float = 0.8  # share of patients with a lesion


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{name}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        return origin(_coerce(v, item, name) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "1e-5" (no dot) as a string; it is a number to anyone typing lr=1e-5.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, str) and isinstance(value, annotation) and not isinstance(value, bool):
        return value
    if annotation is Any:
        return value
    if annotation is dict and isinstance(value, dict):
        return value
    raise ConfigError(f"{name}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build a config dataclass from a plain mapping; unknown keys are errors, not ignored."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown setting {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` pairs onto a nested mapping; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        set_setting(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return data


def set_setting(data: dict, dotted: str, value: Any) -> None:
    """`value` at the dotted key `a.b.c` of a nested mapping; a mapping merges into the section
    already there (as `merge_into` does)."""
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {dotted}: {part} is not a section")
    merge_into(node, {leaf: value})


def merge_into(data: dict, values: dict) -> None:
    """`values` into `data`, section by section: a flag that sets one nested field (--model is
    segmenter.model) keeps the file's others."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merge_into(data[key], value)
        else:
            data[key] = value


def read_mapping(path: str) -> dict:
    """A YAML file's top-level mapping (local or s3://)."""
    from brainseg_ray.storage import read_bytes

    loaded = yaml.safe_load(read_bytes(path)) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def config_from_mapping(cls: type[T], settings: dict, overrides: list[str] | None = None, /, **values: Any) -> T:
    """`settings` (a file's) < keyword values (from CLI flags; None: not given) < key=value
    overrides, as a `cls`. Positional-only, so a setting may be called `settings` or `data`."""
    data = dict(settings)
    merge_into(data, {k: v for k, v in values.items() if v is not None})
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def load_config(cls: type[T], path: str | None = None, overrides: list[str] | None = None, /,
                **values: Any) -> T:
    """Defaults < YAML file < keyword values (from CLI flags) < key=value overrides."""
    return config_from_mapping(cls, read_mapping(path) if path else {}, overrides, **values)


@dataclass
class ServeAutoscaling:
    """Ray Serve's autoscaling_config for the Segmenter deployment."""

    min_replicas: int = 1
    max_replicas: int = 2
    # Requests in flight per replica the autoscaler aims at; with batching, a replica works best
    # with about a batch queued behind the one it is computing.
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0


@dataclass
class ServeConfig:
    """The HTTP segmentation endpoint (`brainseg serve`, serve_config.yaml's `args`)."""

    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    host: str = "127.0.0.1"  # `brainseg serve` only; `serve run` takes serve_config.yaml's http_options
    port: int = 8000  # `brainseg serve` only, as host
    app_name: str = "brainseg"  # the Serve application's name
    route_prefix: str = "/"  # where the routes start
    autoscaling: ServeAutoscaling = field(default_factory=ServeAutoscaling)
    # Segmenter replicas; also their torch threads (at least 1). Two threads per replica measured
    # nearly 2x faster per request than one on a 2-core machine, where one replica fills it.
    cpus_per_replica: float = 2.0
    use_gpu: bool | None = None  # see GPU settings above
    gpus_per_replica: float = 1.0
    max_batch_size: int = 8  # requests that arrive while the model is busy share its next pass
    # A request that finds the model idle waits this long for company (under load, requests gather
    # while the model runs, so no wait is needed for batches)
    batch_wait_timeout_s: float = 0.0
    max_ongoing_requests: int = 32  # per Segmenter replica (several batches' worth)
    ingress_replicas: int = 1
    ingress_max_ongoing_requests: int = 256  # per ingress replica: it mostly waits on the Segmenter
    max_body_mb: float = 10.0  # larger request bodies get 413
    max_image_pixels: int = 4096 * 4096  # larger slices get 400 before they are decoded
    # Bearer token: the variable named here, else auth_token; neither set means no auth.
    auth_token_env: str = "BRAINSEG_API_TOKEN"
    auth_token: str | None = None
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    log_level: str = "INFO"  # Serve's own and the replicas' logs (INFO includes one access line per request)
    s3: S3Options = field(default_factory=S3Options)
    ray: RayConfig = field(default_factory=RayConfig)
