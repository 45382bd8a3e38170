"""The train job's driver: choose patients, build the Ray datasets, run the TorchTrainer, and
leave a run folder behind:

    OUT/split.json        which patients trained and which validated
    OUT/checkpoints/      Ray Train's run folder: epoch-NNNN/ (model artifact + optimiser state),
                          the best `keep_checkpoints` by validation per-patient Dice and the latest
    OUT/history.json|csv  one row per epoch; OUT/curves.png the loss and Dice curves
    OUT/model/            the best epoch's model artifact, what `evaluate`, `segment` and `serve` take

Running the same command again over OUT resumes from the latest checkpoint (Ray Train restores
it from the checkpoints folder's snapshot), unless `resume=false`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from brainseg_ray import storage
from brainseg_ray.config import TrainConfig, to_dict
from brainseg_ray.data import schema
from brainseg_ray.data.tables import patients_dataset
from brainseg_ray.train.loop import SCORE, Plan, train_loop_per_worker

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
SPLIT_FILE = "split.json"


class TrainingError(Exception):
    """A run that could not start or did not finish; the message says why."""


@dataclass
class TrainResult:
    out: str
    model_uri: str
    epochs_run: int
    best_epoch: int | None
    best_val_patient_dice: float | None
    stopped_early: bool
    resumed_from_epoch: int | None
    history: list[dict]

    def summary_line(self) -> str:
        notes = []
        if self.resumed_from_epoch:
            notes.append(f"resumed after epoch {self.resumed_from_epoch}")
        if self.stopped_early:
            notes.append("stopped early")
        extra = f" ({', '.join(notes)})" if notes else ""
        best = "n/a" if self.best_val_patient_dice is None else f"{self.best_val_patient_dice:.4f}"
        return (f"train: {self.epochs_run} epochs{extra}, best validation per-patient Dice {best} "
                f"at epoch {self.best_epoch} -> {self.model_uri}")


def read_manifest(data: str, s3: storage.S3Options) -> dict:
    uri = storage.join(data, schema.MANIFEST_FILE)
    try:
        return json.loads(storage.read_bytes(uri, s3))
    except (storage.StorageError, OSError, ValueError) as exc:
        raise TrainingError(f"{data}: not an ingested dataset (cannot read {schema.MANIFEST_FILE}: {exc})") from exc


def choose_patients(cfg: TrainConfig, tumour_by_patient: dict[str, int]) -> tuple[list[str], list[str], dict]:
    """(train patients, validation patients, how they were chosen): a split file (from `brainseg
    split`, or another run's split.json), a fold, or a split drawn with `val_fraction` and `seed`.
    Always whole patients."""
    from brainseg_ray.data.split import assign_folds, assign_splits, read_split_file

    if cfg.split_file:
        split_file = read_split_file(cfg.split_file, cfg.s3)
        if cfg.fold is not None:
            if not split_file.folds:
                raise TrainingError(f"{cfg.split_file}: has no folds (run `brainseg split --folds K`)")
            train, val = split_file.outside_fold(cfg.fold), split_file.in_fold(cfg.fold)
        else:
            train, val = split_file.in_split("train"), split_file.in_split("val")
        how = {"split_file": cfg.split_file, "fold": cfg.fold}
    elif cfg.fold is not None:
        folds = assign_folds(tumour_by_patient, cfg.folds, cfg.seed)
        val = [p for p, f in folds.items() if f == cfg.fold]
        train = [p for p, f in folds.items() if f != cfg.fold]
        how = {"folds": cfg.folds, "fold": cfg.fold, "seed": cfg.seed}
    else:
        fractions = (1.0 - cfg.val_fraction, cfg.val_fraction, 0.0)
        splits = assign_splits(tumour_by_patient, fractions, cfg.seed)
        train = [p for p, s in splits.items() if s == "train"]
        val = [p for p, s in splits.items() if s == "val"]
        how = {"val_fraction": cfg.val_fraction, "seed": cfg.seed}
    unknown = sorted(set(train + val) - set(tumour_by_patient))
    if unknown:
        raise TrainingError(f"the split names {len(unknown)} patients not in {cfg.data}, e.g. {unknown[0]}")
    if not train or not val:
        raise TrainingError(f"need training and validation patients, got {len(train)} and {len(val)}")
    return sorted(train), sorted(val), how


ENCODER_WEIGHT_CHOICES = ("default", "imagenet", "none")


def model_spec(cfg: TrainConfig):
    """The ModelSpec a run builds: the registry name and its settings, with the encoder weights
    `default` resolved (installed ImageNet weights where they fit the encoder, else random)."""
    from brainseg_ray.models.pretrained import imagenet_checkpoint_path
    from brainseg_ray.models.registry import ModelSpec
    from brainseg_ray.models.smp_models import default_encoder_weights, encoder_of

    if cfg.encoder_weights not in ENCODER_WEIGHT_CHOICES:
        raise TrainingError(f"encoder_weights must be one of {', '.join(ENCODER_WEIGHT_CHOICES)}, "
                            f"got {cfg.encoder_weights!r}")
    weights = {"default": default_encoder_weights(cfg.model), "imagenet": "imagenet", "none": None}[cfg.encoder_weights]
    if cfg.encoder_weights_path and cfg.encoder_weights == "imagenet":
        raise TrainingError("give encoder_weights=imagenet or encoder_weights_path, not both")
    if cfg.encoder_weights_path and cfg.encoder_weights == "default":
        weights = None  # a file the user named wins over the default
    if weights == "imagenet":  # checked here, before any worker starts
        try:
            imagenet_checkpoint_path(encoder_of(cfg.model) or cfg.model)
        except ValueError as exc:
            raise TrainingError(f"encoder_weights=imagenet for model {cfg.model}: {exc}") from None
    return ModelSpec(name=cfg.model, encoder_depth=cfg.encoder_depth, base_filters=cfg.base_filters,
                     encoder_weights_path=cfg.encoder_weights_path, encoder_weights=weights)


def _check_config(cfg: TrainConfig) -> None:
    from brainseg_ray.data.augment import AUGMENTATIONS
    from brainseg_ray.devices import PRECISIONS
    from brainseg_ray.models.inputs import NORMALISATIONS
    from brainseg_ray.models.registry import resolve
    from brainseg_ray.train.losses import LOSSES
    from brainseg_ray.train.steps import SCHEDULES

    if not cfg.data or not cfg.out:
        raise TrainingError("train needs data (an ingested dataset) and out (a run folder)")
    resolve(cfg.model)  # ValueError listing the known names
    checks = [
        (cfg.augmentation in AUGMENTATIONS, f"augmentation must be one of {', '.join(AUGMENTATIONS)}"),
        (cfg.normalisation in NORMALISATIONS, f"normalisation must be one of {', '.join(NORMALISATIONS)}"),
        (cfg.loss in LOSSES, f"loss must be one of {', '.join(sorted(LOSSES))}"),
        (cfg.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
        (cfg.image_size >= 32 and cfg.image_size % 32 == 0, "image_size must be a multiple of 32"),
        (cfg.epochs >= 1 and cfg.batch_size >= 2, "epochs must be >= 1 and batch_size >= 2 (batch norm)"),
        (cfg.num_workers >= 1, "num_workers must be >= 1"),
        (cfg.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        (0.0 < cfg.threshold < 1.0, "threshold must lie between 0 and 1"),
        (cfg.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
        (cfg.warmup_fraction is None or 0.0 <= cfg.warmup_fraction < 1.0, "warmup_fraction must lie in [0, 1)"),
        (cfg.steps is None or cfg.steps >= 1, "steps must be >= 1 (or unset: train by epochs)"),
        (cfg.eval_every_steps >= 1, "eval_every_steps must be >= 1"),
        (cfg.crop_size is None or (cfg.crop_size >= 32 and cfg.crop_size % 32 == 0 and cfg.crop_size <= schema.IMAGE_SIZE),
         f"crop_size must be a multiple of 32 up to the slice size {schema.IMAGE_SIZE}"),
        (cfg.crop_size is None or cfg.image_size == schema.IMAGE_SIZE,
         f"crop_size cuts crops at native resolution: image_size must stay {schema.IMAGE_SIZE}"),
        (0.0 <= cfg.foreground_fraction <= 1.0, "foreground_fraction must lie in [0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)


def _run_config(cfg: TrainConfig):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    if storage.is_s3(cfg.out):
        fs, path = storage.arrow_filesystem(cfg.out, cfg.s3)
        where = {"storage_path": path, "storage_filesystem": fs}
    else:
        where = {"storage_path": os.path.abspath(cfg.out)}
    return RunConfig(
        name=CHECKPOINTS_DIR,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=SCORE,
                                           checkpoint_score_order="max"),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        **where,
    )


def _clear_run(cfg: TrainConfig) -> None:
    fs, root = storage.filesystem(cfg.out, cfg.s3)
    for name in (CHECKPOINTS_DIR, MODEL_DIR):
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)


# Settings a resumed run must share with the checkpoints it continues from.
RESUME_KEYS = ("model", "encoder_depth", "base_filters", "image_size", "data", "normalisation")


def _check_resumable(cfg: TrainConfig, split_record: dict) -> None:
    """Refuse to continue checkpoints of another model, input size, data or split: the weights
    would not load, or the run would silently mix two experiments."""
    checkpoints = storage.join(cfg.out, CHECKPOINTS_DIR)
    record_uri = storage.join(cfg.out, SPLIT_FILE)
    if not storage.exists(checkpoints, cfg.s3) or not storage.exists(record_uri, cfg.s3):
        return
    before = json.loads(storage.read_bytes(record_uri, cfg.s3))
    changed = [k for k in RESUME_KEYS if k in before.get("settings", {}) and before["settings"][k] != getattr(cfg, k)]
    if before.get("train") != split_record["train"] or before.get("val") != split_record["val"]:
        changed.append("patients (split)")
    if changed:
        raise TrainingError(f"{cfg.out} holds checkpoints of a run with other {', '.join(changed)}; "
                            "use another --out, or resume=false to start over there")


def train(cfg: TrainConfig) -> TrainResult:
    """Run the train job (Ray must be initialised)."""
    import ray.train
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from brainseg_ray.data.tables import tumour_slices_by_patient
    from brainseg_ray.models.inputs import normalisation_from_profile
    from brainseg_ray.models.registry import has_unused_parameters
    from brainseg_ray.runtime import cpus_per_actor, job_uses_gpu

    _check_config(cfg)
    # The run records its settings as given: a path of this machine means nothing on the next.
    recorded = {k: v for k, v in to_dict(cfg).items() if k not in ("s3", "ray")}
    if not storage.is_s3(cfg.out):
        # Ray Train's workers run in a directory of their own: a relative run folder would land there.
        cfg = dataclasses.replace(cfg, out=os.path.abspath(cfg.out))
    spec = model_spec(cfg)
    init_state, init_record = _initial_weights(cfg, spec)  # before any data is read: fail fast
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-epoch lines say more
    manifest = read_manifest(cfg.data, cfg.s3)
    train_patients, val_patients, how = choose_patients(cfg, tumour_slices_by_patient(cfg.data, cfg.s3))
    split_record = {**how, "train": train_patients, "val": val_patients,
                    "settings": {k: getattr(cfg, k) for k in RESUME_KEYS}}
    if not cfg.resume:
        _clear_run(cfg)
    else:
        _check_resumable(cfg, split_record)
    storage.makedirs(cfg.out, cfg.s3)
    storage.write_bytes(storage.join(cfg.out, SPLIT_FILE), json.dumps(split_record, indent=1).encode(), cfg.s3)

    train_ds = patients_dataset(cfg.data, cfg.s3, train_patients, shuffle_seed=cfg.seed).materialize()
    # Materialised here, before the trainer starts: a lazy dataset would need CPUs for its read
    # tasks that the training workers already hold, and Ray Train then waits forever, silently.
    val_ds = patients_dataset(cfg.data, cfg.s3, val_patients).materialize()
    n_train, n_val = train_ds.count(), val_ds.count()
    per_worker = n_train // cfg.num_workers
    if per_worker < cfg.batch_size:
        raise TrainingError(f"{n_train} training slices give {per_worker} per worker, fewer than batch_size "
                            f"{cfg.batch_size}; lower batch_size or num_workers")
    cpus = cpus_per_actor(cfg.num_workers, cfg.cpus_per_worker, cap=8)
    use_gpu = job_uses_gpu(cfg.use_gpu)  # one GPU a worker: DDP ranks cannot share one
    steps_per_epoch = per_worker // cfg.batch_size
    total_steps = cfg.steps or steps_per_epoch * cfg.epochs
    rounds = -(-cfg.steps // cfg.eval_every_steps) if cfg.steps else cfg.epochs
    plan = Plan(
        config=to_dict(cfg),
        spec=dict(vars(spec)),
        normalisation=normalisation_from_profile(manifest.get("profile"), cfg.normalisation),
        data_fingerprint=manifest.get("fingerprint"),
        val_patients=val_patients,
        total_steps=total_steps,
        rounds=rounds,
        find_unused_parameters=has_unused_parameters(spec),
        threads=max(1, int(cpus)),
        out=cfg.out,
        training_record={
            "config": recorded,
            "split": split_record,
            "slices": {"train": n_train, "val": n_val},
            "data": cfg.data,
            **({"init_from": init_record} if init_record else {}),
        },
        init_state=init_state,
    )
    budget = f"{total_steps} steps" + (f" of {cfg.crop_size}px crops" if cfg.crop_size else "")
    print(f"train: {cfg.model} on {len(train_patients)} patients ({n_train} slices), validating on "
          f"{len(val_patients)} ({n_val} slices); {budget}; {cfg.num_workers} worker(s) x {cpus:g} CPU"
          f"{' + GPU' if use_gpu else ''}", flush=True)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=vars(plan),  # a plain dict, as Ray Train takes it (asdict would copy init_state)
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=_run_config(cfg),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(f"training failed: {exc}") from exc
    if result.error:
        raise TrainingError(f"training failed: {result.error}")
    return _finish(cfg, result)


def _initial_weights(cfg: TrainConfig, spec) -> tuple[dict | None, dict | None]:
    """The state_dict of cfg.init_from (sent to every worker with the plan, so nodes need no access
    to the file) and what to record of it; (None, None) without one."""
    from brainseg_ray.models.artifact import ArtifactError, load_artifact
    from brainseg_ray.models.inputs import normalisation_mode
    from brainseg_ray.models.registry import model_settings

    if not cfg.init_from:
        return None, None
    try:
        artifact = load_artifact(cfg.init_from, cfg.s3)  # `reference` included
    except ArtifactError as exc:
        raise TrainingError(f"init_from: {exc}") from None
    mine, theirs = model_settings(spec), model_settings(artifact.spec)
    if mine != theirs:
        raise TrainingError(f"init_from {cfg.init_from}: its model {theirs} differs from this run's {mine}")
    # Its weights learned inputs normalised one way: a stage that feeds them another starts off wrong.
    theirs = normalisation_mode(artifact.metadata.get("normalisation", {}))
    if theirs != cfg.normalisation:
        raise TrainingError(f"init_from {cfg.init_from}: it was trained with normalisation={theirs}, "
                            f"this run has normalisation={cfg.normalisation}")
    state = {k: v.detach().float().clone() for k, v in artifact.model.state_dict().items()}
    return state, {"uri": cfg.init_from, "version": artifact.metadata.get("version", "")}


def chosen_checkpoint(checkpoints: list[tuple], best_epoch: int | None) -> tuple:
    """Of Ray Train's kept (checkpoint, metrics) pairs, the one the run called best: the epoch of
    its last improvement by more than `min_delta`, the rule early stopping follows too. Where that
    one was not kept (a later epoch beat it by less than min_delta and ranked higher), the highest
    score; among equals the earliest epoch (the simpler model of a plateau)."""
    ranked = [(c, m) for c, m in checkpoints if m.get(SCORE) is not None]
    if not ranked:
        raise TrainingError("training finished without a checkpoint")
    for checkpoint, metrics in ranked:
        if best_epoch is not None and metrics["epoch"] == best_epoch:
            return checkpoint, metrics
    return max(ranked, key=lambda cm: (cm[1][SCORE], -cm[1]["epoch"]))


def _finish(cfg: TrainConfig, result) -> TrainResult:
    """Save the best checkpoint's model again as OUT/model (float16 with half_weights)."""
    from brainseg_ray.models.artifact import load_artifact, resave_artifact
    from brainseg_ray.train.history import read_history

    returned = result.return_value or {}
    progress = returned.get("progress") or {}
    checkpoint, metrics = chosen_checkpoint(result.best_checkpoints or [], progress.get("best_epoch"))
    model_uri = storage.join(cfg.out, MODEL_DIR)
    with checkpoint.as_directory() as folder:
        artifact = load_artifact(folder)
    resave_artifact(artifact, model_uri, half=cfg.half_weights,
                    training={**artifact.metadata["training"], "epoch": metrics["epoch"]}, s3=cfg.s3)
    history = read_history(cfg.out, cfg.s3)
    return TrainResult(out=cfg.out, model_uri=model_uri, epochs_run=len(history), best_epoch=metrics["epoch"],
                       best_val_patient_dice=metrics[SCORE] if metrics[SCORE] >= 0 else None,
                       stopped_early=bool(progress.get("stopped_early")),
                       resumed_from_epoch=returned.get("resumed_from_epoch"), history=history)
