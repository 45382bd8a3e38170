"""The per-worker training loop that Ray Train runs on each of `num_workers` workers.

Each round (an epoch, or `eval_every_steps` optimizer steps): the worker's shard of the training set
(Ray Data streaming split, equal sizes so DDP ranks take the same number of steps) is augmented
here, on the worker; then every rank validates its share of the validation patients, and the
round's figures are gathered so all ranks see the same numbers and take the same early-stopping
decision. Rank 0 writes a checkpoint (a model artifact plus the optimiser state) and the history;
`ray.train.report` is called by every rank.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from brainseg_ray.compat import ensure_torchvision_importable
from brainseg_ray.train.metrics import SegmentationMetrics

TRAINING_STATE_FILE = "training_state.pt"
CHECKPOINT_HISTORY_FILE = "history.json"
SCORE = "val_patient_dice"


@dataclass
class Plan:
    """What the driver sends every worker (as a plain dict: Ray Train's train_loop_config)."""

    config: dict  # the TrainConfig as a dict, to run by (its out made absolute)
    spec: dict  # the ModelSpec's fields
    normalisation: dict
    data_fingerprint: str | None
    val_patients: list[str]
    total_steps: int  # optimizer steps per worker over the whole run
    rounds: int  # validation + checkpoint rounds: epochs, or eval_every_steps each
    find_unused_parameters: bool  # DDP: the model keeps parameters its forward pass skips
    threads: int  # torch threads: the CPUs this worker holds
    out: str  # the run folder, absolute (workers run in a directory of their own)
    training_record: dict  # model.json's "training", as the user gave the settings
    init_state: dict | None = None  # init_from's weights; a restored checkpoint wins over them

    def round_name(self, epoch: int, step: int) -> str:
        if self.config["steps"]:
            return f"step {step}/{self.total_steps}"
        return f"epoch {epoch}/{self.rounds}"


@dataclass
class RoundResult:
    """One rank's share of a round; every rank gathers every rank's."""

    metrics: SegmentationMetrics  # validation counts of this rank's patients
    val_loss_sum: float
    val_count: int  # validation slices
    loss_sum: float  # training loss summed over samples
    samples: int  # training samples
    train_seconds: float
    foreground: int  # crops centred near tumour


def _gather(value):
    """Every rank's `value`, in rank order (just [value] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _arrow_batches(iterator, batch_size: int, **kwargs):
    from brainseg_ray.data import schema
    from brainseg_ray.data.tables import decode_tensor

    for batch in iterator.iter_batches(batch_size=batch_size, batch_format="pyarrow", **kwargs):
        yield (batch.column("patient_id").to_pylist(),
               decode_tensor(batch.column("image"), schema.IMAGE_SHAPE),
               decode_tensor(batch.column("mask"), schema.MASK_SHAPE))


def _restore(checkpoint, model, step) -> tuple[dict, list[dict]]:
    from brainseg_ray.models.artifact import load_artifact

    with checkpoint.as_directory() as folder:
        model.load_state_dict(load_artifact(folder).model.state_dict())
        state = torch.load(os.path.join(folder, TRAINING_STATE_FILE), map_location="cpu", weights_only=True)
        with open(os.path.join(folder, CHECKPOINT_HISTORY_FILE)) as f:
            history = json.load(f)
    step.load_state_dict(state)
    return state["progress"], history


def _write_checkpoint(folder: str, model, plan: Plan, step, progress: dict, history: list[dict], metrics: dict) -> None:
    from brainseg_ray.models.artifact import save_artifact
    from brainseg_ray.models.spec import ModelSpec

    save_artifact(folder, model, ModelSpec(**plan.spec), normalisation=plan.normalisation,
                  threshold=plan.config["threshold"], training=plan.training_record,
                  data_fingerprint=plan.data_fingerprint, metrics=metrics,
                  input_size=plan.config["image_size"], onnx=False)
    torch.save({**step.state_dict(), "progress": progress}, os.path.join(folder, TRAINING_STATE_FILE))
    with open(os.path.join(folder, CHECKPOINT_HISTORY_FILE), "w") as f:
        json.dump(history, f)


def train_loop_per_worker(config: dict) -> dict:
    ensure_torchvision_importable()  # before smp/timm/torchvision are imported in this process
    return _Worker(Plan(**config)).run()


class _Worker:
    """One rank's model, optimiser, data and progress, and the rounds it runs."""

    def __init__(self, plan: Plan):
        import ray.train
        import ray.train.torch

        from brainseg_ray.data.augment import build_augmentation
        from brainseg_ray.data.crops import CropSampler
        from brainseg_ray.devices import resolve_precision
        from brainseg_ray.storage import S3Options

        self.plan, self.cfg = plan, plan.config
        cfg = self.cfg
        context = ray.train.get_context()
        self.rank, world = context.get_world_rank(), context.get_world_size()
        # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker was given.
        torch.set_num_threads(plan.threads)
        torch.manual_seed(cfg["seed"] * 1000 + self.rank)  # before the model is built: its initial weights
        self.device = ray.train.torch.get_device()
        self.precision = resolve_precision(cfg["precision"], self.device)
        self.size, self.channels_last = cfg["image_size"], cfg["channels_last"]
        self.train_size = cfg["crop_size"] or self.size  # crops are cut at native resolution, never resized

        self._build_model()
        self._resume()
        self._wrap_for_ddp()

        self.augment = build_augmentation(cfg["augmentation"], seed=cfg["seed"] * 1000 + self.rank)
        # Seeded by the resumed position too, so a resumed run does not replay the crops it saw.
        self.crop = (CropSampler(cfg["crop_size"], cfg["foreground_fraction"],
                                 seed=(cfg["seed"], self.rank, self.progress["step"]))
                     if cfg["crop_size"] else None)
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_data = ray.train.get_dataset_shard("val")
        # Validation patients are dealt to ranks, so each patient's slices meet on one rank.
        self.my_val_patients = set(plan.val_patients[self.rank::world])
        self.s3 = S3Options(**cfg["s3"])

    def _build_model(self) -> None:
        from brainseg_ray.models.registry import build_model
        from brainseg_ray.models.spec import ModelSpec
        from brainseg_ray.train.losses import build_loss
        from brainseg_ray.train.steps import TrainStep, build_optimizer, build_schedule

        cfg, plan = self.cfg, self.plan
        self.model = build_model(ModelSpec(**plan.spec))
        if plan.init_state is not None:  # init_from; a checkpoint restored below wins over it
            self.model.load_state_dict(plan.init_state)
        self.optimizer = build_optimizer(self.model, cfg["lr"], cfg["weight_decay"])
        scheduler = build_schedule(self.optimizer, cfg["schedule"], cfg["lr"], plan.total_steps, cfg["warmup_fraction"])
        self.loss_fn = build_loss(cfg["loss"])
        self.step = TrainStep(self.model, self.loss_fn, self.optimizer, self.device, self.precision,
                              cfg["grad_clip"], scheduler)

    def _resume(self) -> None:
        """Progress and history from Ray Train's latest checkpoint, or a fresh start."""
        import ray.train

        self.progress = {"epoch": 0, "step": 0, "best_score": None, "best_epoch": None, "bad_epochs": 0,
                         "stopped_early": False}
        self.history: list[dict] = []
        self.resumed_from = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        self.progress, self.history = _restore(checkpoint, self.model, self.step)
        self.progress.setdefault("step", 0)
        self.resumed_from = self.progress["epoch"]
        if self.rank == 0:
            print(f"train: resuming after {self.plan.round_name(self.resumed_from, self.progress['step'])} "
                  f"from {checkpoint.path}", flush=True)

    def _wrap_for_ddp(self) -> None:
        import ray.train.torch

        model = self.model
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": self.plan.find_unused_parameters})
        self.step.model = model
        # Validation runs on the bare module, never the DDP wrapper: see validate_round.
        self.unwrapped = model.module if hasattr(model, "module") else model
        # Optimiser state restored above refers to the same parameter objects DDP now wraps.
        for group in self.optimizer.state.values():
            for key, value in group.items():
                if isinstance(value, torch.Tensor):
                    group[key] = value.to(self.device)

    def _shard_pass(self, index: int):
        cfg = self.cfg
        return _arrow_batches(self.train_shard, cfg["batch_size"], drop_last=True,
                              local_shuffle_buffer_size=cfg["batch_size"] * 8,
                              local_shuffle_seed=cfg["seed"] * 100003 + index * 101 + self.rank, prefetch_batches=2)

    def _endless_batches(self, first_pass: int):
        for index in itertools.count(first_pass):
            yield from self._shard_pass(index)

    def run(self) -> dict:
        cfg, plan, progress = self.cfg, self.plan, self.progress
        # By steps: rounds of eval_every_steps drawn from pass after pass over the shard. By epochs:
        # one pass per round. Ranks hold equal shards, so they take the same number of steps.
        stream = self._endless_batches(progress["epoch"] + 1) if cfg["steps"] else None
        first_epoch = progress["epoch"] + 1
        for epoch in range(first_epoch, plan.rounds + 1):
            if progress["stopped_early"]:
                break
            if stream is not None:
                batches = itertools.islice(stream, min(cfg["eval_every_steps"], plan.total_steps - progress["step"]))
            else:
                batches = self._shard_pass(epoch)
            loss_sum, samples, foreground, train_seconds = self.train_round(batches)
            started = time.perf_counter()
            metrics, val_loss_sum, val_count = self.validate_round()
            gathered = _gather(RoundResult(metrics, val_loss_sum, val_count, loss_sum, samples, train_seconds,
                                           foreground))
            self.finish_round(epoch, gathered, started)
        return {"resumed_from_epoch": self.resumed_from, "progress": progress, "epochs_in_history": len(self.history)}

    def train_round(self, batches) -> tuple[float, int, int, float]:
        """(loss summed over samples, samples, foreground crops, seconds) of one round's batches."""
        from brainseg_ray.train.steps import training_batch

        started = time.perf_counter()
        loss_sum, samples, foreground = 0.0, 0, 0
        for _, images, masks in batches:
            x, y, centred = training_batch(images, masks, normalisation=self.plan.normalisation, augment=self.augment,
                                           size=self.train_size, device=self.device,
                                           channels_last=self.channels_last, crop=self.crop)
            foreground += centred
            loss_sum += self.step(x, y) * len(x)
            samples += len(x)
            self.progress["step"] += 1
        return loss_sum, samples, foreground, time.perf_counter() - started

    def validate_round(self) -> tuple[SegmentationMetrics, float, int]:
        """This rank's validation patients: metrics, summed loss and slices."""
        from brainseg_ray.train.steps import validate

        def my_batches():
            for ids, images, masks in _arrow_batches(self.val_data, self.cfg["batch_size"]):
                keep = np.fromiter((p in self.my_val_patients for p in ids), bool, len(ids))
                yield [p for p, k in zip(ids, keep) if k], images[keep], masks[keep]

        # The bare module, not the DDP wrapper: DDP's forward broadcasts buffers (a collective), and
        # ranks validate different numbers of batches (whole patients are dealt out, so a rank may
        # have none), which left the rank with more batches waiting forever for the others.
        return validate(self.unwrapped, my_batches(), loss_fn=self.loss_fn, normalisation=self.plan.normalisation,
                        size=self.size, device=self.device, precision=self.precision,
                        channels_last=self.channels_last, threshold=self.cfg["threshold"])

    def finish_round(self, epoch: int, gathered: list[RoundResult], val_started: float) -> None:
        """Merge every rank's round, decide on early stopping, and report: a history row and, on
        rank 0, the checkpoint."""
        import ray.train

        from brainseg_ray.train.history import write_history

        cfg, plan, progress = self.cfg, self.plan, self.progress
        merged = SegmentationMetrics()
        for result in gathered:
            merged.merge(result.metrics)
        summary = merged.compute()
        val_count_all = sum(r.val_count for r in gathered)
        samples_all = sum(r.samples for r in gathered)
        slowest = max(r.train_seconds for r in gathered)
        score = summary["patient_dice_mean"]

        improved = score is not None and (progress["best_score"] is None
                                          or score > progress["best_score"] + cfg["min_delta"])
        if improved:
            progress.update(best_score=score, best_epoch=epoch, bad_epochs=0)
        else:
            progress["bad_epochs"] += 1
        progress["epoch"] = epoch
        patience = cfg["early_stopping_patience"]
        progress["stopped_early"] = bool(patience and progress["bad_epochs"] >= patience and epoch < plan.rounds)
        detection = summary["detection"]
        row = {
            "epoch": epoch,
            "step": progress["step"],
            "train_loss": sum(r.loss_sum for r in gathered) / max(samples_all, 1),
            "val_loss": sum(r.val_loss_sum for r in gathered) / max(val_count_all, 1),
            SCORE: score,
            "val_patient_dice_tumour": summary["patient_dice_mean_tumour"],
            "val_slice_dice": summary["slice_dice_mean"],
            "val_sensitivity": detection["sensitivity"],
            "val_specificity": detection["specificity"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_samples": samples_all,
            **({"train_foreground_crops": sum(r.foreground for r in gathered)} if self.crop is not None else {}),
            "train_seconds": round(slowest, 3),
            "train_samples_per_s": round(samples_all / slowest, 2) if slowest > 0 else None,
            "val_seconds": round(time.perf_counter() - val_started, 3),
            "is_best": improved,
        }
        self.history.append(row)
        report = {**row, "best_val_patient_dice": progress["best_score"], "best_epoch": progress["best_epoch"],
                  "stopped_early": progress["stopped_early"]}
        # Checkpoints are ranked by this score; a run with no validation figure ranks them last.
        report[SCORE] = score if score is not None else -1.0

        if self.rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="brainseg-ckpt-") as folder:
            _write_checkpoint(folder, self.unwrapped, plan, self.step, progress, self.history,
                              metrics={"epoch": epoch, "validation": summary, "train_loss": row["train_loss"]})
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"epoch-{epoch:04d}")
        write_history(plan.out, self.history, self.s3)
        best = progress["best_score"]
        print(f"train: {plan.round_name(epoch, progress['step'])}: train loss {row['train_loss']:.4f}, "
              f"val loss {row['val_loss']:.4f}, val per-patient Dice {_fmt(score)} "
              f"(best {_fmt(best)} at epoch {progress['best_epoch']}), "
              f"{samples_all} slices in {slowest:.1f} s", flush=True)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
