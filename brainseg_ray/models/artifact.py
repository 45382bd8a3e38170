"""The model artifact: a directory (local path or s3:// URI) holding weights and `model.json`.

    weights.safetensors   the state_dict (weights.pt, a torch.save of a plain state_dict of
                          tensors, when safetensors is not installed); never a pickled model
    model.onnx            the graph for ONNX Runtime, its parameters read from weights.safetensors
                          (models/onnx_graph.py); absent from artifacts written before it existed
    model.json            what the weights are: spec, input, normalisation, threshold, training
                          config, data fingerprint, metrics, version, and the files' SHA-256.
                          Written last: its presence means the artifact is complete.

`load_artifact` is the one loader every consumer (evaluation, batch inference, serving) uses.
Weights are read with safetensors or `torch.load(weights_only=True)`, so a file whose unpickling
would run code is refused, and their SHA-256 (and model.onnx's) is checked against model.json.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from torch import nn

from brainseg_ray import storage
from brainseg_ray.data.schema import CHANNEL_NAMES, IMAGE_SIZE
from brainseg_ray.models.onnx_graph import ONNX_FILE, export_onnx
from brainseg_ray.models.registry import ModelSpec, build_model

FORMAT_VERSION = 1
METADATA_FILE = "model.json"
SAFETENSORS_FILE = "weights.safetensors"
TORCH_FILE = "weights.pt"
CARD_FILE = "MODEL_CARD.md"  # optional: what the model is, how it was made and measured

try:  # optional: the fallback is a weights_only torch file
    import safetensors.torch as _safetensors
except ImportError:  # pragma: no cover - safetensors is installed here
    _safetensors = None

log = logging.getLogger(__name__)


class ArtifactError(Exception):
    """An artifact that cannot be written or loaded; the message names its URI and the reason."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"model artifact {uri}: {reason}")
        self.uri = uri
        self.reason = reason


@dataclass
class ModelArtifact:
    spec: ModelSpec
    metadata: dict  # the content of model.json
    model: nn.Module  # eval mode, float32, CPU
    weights_file: str = SAFETENSORS_FILE
    weights: bytes = b""  # the weights file's bytes (model.onnx's external data)
    onnx: bytes | None = None  # model.onnx, when the artifact has one


def save_artifact(
    uri: str,
    model: nn.Module,
    spec: ModelSpec,
    *,
    normalisation: dict,
    threshold: float = 0.5,
    training: dict | None = None,
    data_fingerprint: str | None = None,
    metrics: dict | None = None,
    half: bool = False,
    input_size: int = IMAGE_SIZE,
    postprocess: dict | None = None,
    extra: dict | None = None,
    s3: storage.S3Options | None = None,
    onnx: bool = True,
) -> str:
    """Write `model`'s weights and model.json under `uri`; returns the artifact's version.

    `input_size` is the side the model was trained at: consumers resize slices to it and its
    output back to the slice's size (models/inputs.py). `postprocess` (min_component_px,
    largest_component_3d) is the post-processing chosen with the threshold, which a Segmenter
    applies unless told otherwise. `extra` adds top-level keys (e.g. where an export came from).
    `s3` reaches an s3:// `uri` (by default the AWS environment's endpoint and region).
    `onnx=False` leaves model.onnx out (training's checkpoints: only the final model needs one).
    """
    for key in ("mean", "std"):
        values = normalisation.get(key)
        if not isinstance(values, (list, tuple)) or len(values) != spec.in_channels:
            raise ArtifactError(uri, f"normalisation[{key!r}] must list {spec.in_channels} values, got {values!r}")
    target, percentile = normalisation.get("slice_target"), normalisation.get("slice_percentile")
    if target is not None and not (0 < float(target) <= 255 and percentile is not None and 0 < float(percentile) <= 100):
        raise ArtifactError(uri, f"normalisation slice_target must be in (0, 255] with slice_percentile in (0, 100], "
                                 f"got {target!r} and {percentile!r}")
    state = _plain_state_dict(model, half)
    weights_file = SAFETENSORS_FILE if _safetensors is not None else TORCH_FILE
    data = _serialise(state, weights_file)
    digest = hashlib.sha256(data).hexdigest()
    graph = _onnx_graph(uri, model, state, spec, weights_file, data, input_size) if onnx else None
    version = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', spec.name)}-{digest[:12]}"  # usable as a path or tag
    model_fields = dataclasses.asdict(spec)
    model_fields.pop("encoder_weights_path")  # the weights are in the artifact now
    model_fields.pop("encoder_weights")
    channels = list(CHANNEL_NAMES) if spec.in_channels == len(CHANNEL_NAMES) else None
    metadata = {
        "format_version": FORMAT_VERSION,
        "architecture": spec.name,
        "model": model_fields,
        "input": {"size": int(input_size), "channels": spec.in_channels, "channel_names": channels},
        "normalisation": {"scale": 255, **normalisation},
        "threshold": float(threshold),
        **({"postprocess": dict(postprocess)} if postprocess else {}),
        "training": training or {},
        "data_fingerprint": data_fingerprint,
        "metrics": metrics or {},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": version,
        "dtype": "float16" if half else "float32",
        "weights_file": weights_file,
        "weights_sha256": digest,
        **({"onnx_file": ONNX_FILE, "onnx_sha256": hashlib.sha256(graph).hexdigest()} if graph else {}),
        **(extra or {}),
    }
    text = json.dumps(metadata, indent=2, sort_keys=False, default=_json_default) + "\n"
    meta_uri = storage.join(uri, METADATA_FILE)
    # Remove an older model.json first, so a crash below leaves an incomplete artifact rather
    # than old metadata beside new weights.
    if storage.exists(meta_uri, s3):
        fs, path = storage.filesystem(meta_uri, s3)
        fs.rm(path)
    storage.write_bytes(storage.join(uri, weights_file), data, s3)
    if graph:
        storage.write_bytes(storage.join(uri, ONNX_FILE), graph, s3)
    storage.write_bytes(meta_uri, text.encode(), s3)
    return version


def _onnx_graph(uri: str, model: nn.Module, state: dict, spec: ModelSpec, weights_file: str, data: bytes,
                input_size: int) -> bytes | None:
    """model.onnx for the weights as saved (a float16 artifact's graph computes with the rounded
    weights, as the loaded torch model does); None, with a warning, where the exporter fails: the
    torch backend still serves such an artifact."""
    if weights_file != SAFETENSORS_FILE:
        return None
    exported = copy.deepcopy(model).to("cpu").float().eval()
    exported.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    try:
        return export_onnx(exported, weights_file, data, input_size, spec.in_channels)
    except Exception as exc:  # the exporter's errors have no common type
        log.warning("model artifact %s: no %s written (ONNX export failed: %s)", uri, ONNX_FILE, exc)
        return None


def save_untrained_artifact(uri: str, spec: ModelSpec, *, seed: int = 0, normalisation: dict | None = None,
                            threshold: float = 0.5, input_size: int = IMAGE_SIZE) -> str:
    """A freshly initialised model of `spec` (the same weights for a seed) saved under `uri`, for
    tests and benchmarks of plumbing, faults and speed, which do not depend on the weights.
    `normalisation` (mean and std) defaults to models/inputs.py's. Returns `uri`."""
    from brainseg_ray.models.inputs import DEFAULT_NORMALISATION

    torch.manual_seed(seed)
    normalisation = normalisation or {k: DEFAULT_NORMALISATION[k] for k in ("mean", "std")}
    save_artifact(uri, build_model(spec).eval(), spec, normalisation=normalisation, threshold=threshold,
                  input_size=input_size)
    return uri


def load_artifact(uri: str, s3: storage.S3Options | None = None) -> ModelArtifact:
    """The model under `uri` (or `reference`: the shipped model), in eval mode, float32 on CPU,
    with its metadata. `s3` reaches an s3:// `uri` (by default the AWS environment's endpoint)."""
    uri = _resolve(uri)
    metadata = _read_metadata(uri, s3)
    fields = dict(metadata.get("model") or {})
    fields["name"] = metadata.get("architecture", fields.get("name"))
    known = {f.name for f in dataclasses.fields(ModelSpec)} - {"encoder_weights_path", "encoder_weights"}
    if not isinstance(fields["name"], str) or set(fields) - known:
        raise ArtifactError(uri, f"model.json 'model' has unknown fields {sorted(set(fields) - known)} or no name")
    spec = ModelSpec(**fields)
    try:
        model = build_model(spec)
    except ValueError as exc:
        raise ArtifactError(uri, f"unknown architecture: {exc}") from exc

    weights_file, data = _verified_weights(uri, metadata, s3)
    state = _deserialise(uri, data, weights_file)
    _load_state(uri, spec.name, model, state)
    model.float().eval()
    return ModelArtifact(spec=spec, metadata=metadata, model=model, weights_file=weights_file, weights=data,
                         onnx=_verified_onnx(uri, metadata, s3))


def resave_artifact(artifact: ModelArtifact, out: str, *, half: bool = False, threshold: float | None = None,
                    postprocess: dict | None = None, training: dict | None = None, extra: dict | None = None,
                    s3: storage.S3Options | None = None) -> str:
    """A loaded artifact saved again under `out`, with its metadata (normalisation, threshold,
    post-processing, training record, data fingerprint, metrics, input size), optionally in
    float16 and with what is given replaced: `postprocess` merges into the recorded choice,
    `training` replaces the record, `extra` adds top-level keys. Returns the version."""
    meta = artifact.metadata
    chosen = {**(meta.get("postprocess") or {}), **(postprocess or {})}
    normalisation = {k: v for k, v in meta["normalisation"].items() if k != "scale"}  # per-slice keys too
    return save_artifact(
        out, artifact.model, artifact.spec, normalisation=normalisation,
        threshold=meta.get("threshold", 0.5) if threshold is None else threshold,
        training=meta.get("training") if training is None else training,
        data_fingerprint=meta.get("data_fingerprint"), metrics=meta.get("metrics"), half=half,
        input_size=meta["input"]["size"], postprocess=chosen or None, extra=extra, s3=s3)


def export_artifact(source: str, out: str, *, half: bool = False, threshold: float | None = None,
                    postprocess: dict | None = None, card: str | None = None,
                    s3: storage.S3Options | None = None) -> str:
    """A copy of the artifact at `source` under `out`, optionally in float16 and with a chosen
    threshold and post-processing; `card` (a Markdown file) is copied beside it as MODEL_CARD.md.
    Its training record and metrics are kept; `exported_from` names the source. Returns the version."""
    artifact = load_artifact(source, s3)
    if card:
        storage.write_bytes(storage.join(out, CARD_FILE), storage.read_bytes(card, s3), s3)
    return resave_artifact(artifact, out, half=half, threshold=threshold, postprocess=postprocess,
                           extra={"exported_from": {"uri": source, "version": artifact.metadata.get("version", "")}},
                           s3=s3)


def check_artifact(uri: str, s3: storage.S3Options | None = None) -> dict:
    """The artifact's metadata, once its model.json is readable and its weights (and model.onnx)
    match their SHA-256; cheaper than load_artifact (no model is built), for a driver that only hands the
    URI on to workers but should refuse a bad artifact before starting them."""
    uri = _resolve(uri)
    metadata = _read_metadata(uri, s3)
    _verified_weights(uri, metadata, s3)
    _verified_onnx(uri, metadata, s3)
    return metadata


def _resolve(uri: str) -> str:
    from brainseg_ray.models.reference import resolve_model_uri

    try:
        return resolve_model_uri(uri)
    except FileNotFoundError as exc:
        raise ArtifactError(uri, str(exc)) from None


def _verified_weights(uri: str, metadata: dict, s3: storage.S3Options | None) -> tuple[str, bytes]:
    weights_file = metadata.get("weights_file", SAFETENSORS_FILE)
    if weights_file not in (SAFETENSORS_FILE, TORCH_FILE):
        raise ArtifactError(uri, f"unsupported weights_file {weights_file!r}")
    return weights_file, _verified_file(uri, weights_file, metadata.get("weights_sha256"), s3)


def _verified_onnx(uri: str, metadata: dict, s3: storage.S3Options | None) -> bytes | None:
    if not metadata.get("onnx_file"):
        return None
    if metadata["onnx_file"] != ONNX_FILE:
        raise ArtifactError(uri, f"unsupported onnx_file {metadata['onnx_file']!r}")
    if not metadata.get("onnx_sha256"):  # recorded with every graph since graphs were added
        raise ArtifactError(uri, f"{METADATA_FILE} names {ONNX_FILE} but records no onnx_sha256")
    return _verified_file(uri, ONNX_FILE, metadata["onnx_sha256"], s3)


def _verified_file(uri: str, name: str, sha256: str | None, s3: storage.S3Options | None) -> bytes:
    """The bytes of `name` under `uri`, refused where they do not hash to `sha256` (None: unchecked,
    as in artifacts written before model.json recorded the weights' hash)."""
    try:
        data = storage.read_bytes(storage.join(uri, name), s3)
    except (storage.StorageError, OSError) as exc:
        raise ArtifactError(uri, f"cannot read {name}: {exc}") from exc
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(uri, f"{name} does not match the SHA-256 in model.json (changed or partly written)")
    return data


def _read_metadata(uri: str, s3: storage.S3Options | None) -> dict:
    meta_uri = storage.join(uri, METADATA_FILE)
    try:
        present = storage.exists(meta_uri, s3)
    except storage.StorageError as exc:
        raise ArtifactError(uri, str(exc)) from exc
    if not present:
        where = "no such directory" if not storage.is_s3(uri) and not storage.exists(uri, s3) else f"no {METADATA_FILE}"
        raise ArtifactError(uri, f"{where} (not an artifact, or one not completely written)")
    try:
        metadata = json.loads(storage.read_bytes(meta_uri, s3))
    except (ValueError, storage.StorageError, OSError) as exc:
        raise ArtifactError(uri, f"unreadable {METADATA_FILE}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ArtifactError(uri, f"{METADATA_FILE} is not a JSON object")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(uri, f"unsupported format_version {metadata.get('format_version')!r} (this code reads {FORMAT_VERSION})")
    return metadata


def _plain_state_dict(model: nn.Module, half: bool) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (safetensors needs unshared, contiguous tensors)."""
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        state[name] = tensor.contiguous().clone()
    return state


def _serialise(state: dict[str, torch.Tensor], weights_file: str) -> bytes:
    if weights_file == SAFETENSORS_FILE:
        return _safetensors.save(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _deserialise(uri: str, data: bytes, weights_file: str) -> dict[str, torch.Tensor]:
    if weights_file == SAFETENSORS_FILE:
        if _safetensors is None:
            raise ArtifactError(uri, f"{weights_file} needs the safetensors package, which is not installed")
        try:
            return _safetensors.load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise ArtifactError(uri, f"unreadable {weights_file}: {exc}") from exc
    try:
        # weights_only: tensors and plain containers only; anything else (code) is refused.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(
            uri, f"refused {weights_file}: not a plain state_dict of tensors (weights-only load failed: {exc})"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ArtifactError(uri, f"{weights_file} is not a state_dict (a dict of name -> tensor)")
    return state


def _load_state(uri: str, name: str, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ArtifactError(
            uri,
            f"weights do not match architecture {name!r}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}",
        )
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ArtifactError(uri, f"weights do not match architecture {name!r} (shapes): {'; '.join(wrong[:5])}")
    # float16 artifacts load back into the float32 module (copy_ converts; keep it explicit).
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def _json_default(value):
    """Numbers and paths from training configs (numpy scalars, Path) as JSON."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
