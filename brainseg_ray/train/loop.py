"""The per-worker training loop that Ray Train runs on each of `num_workers` workers.

Each epoch: the worker's shard of the training set (Ray Data streaming split, equal sizes so DDP
ranks take the same number of steps) is augmented here, on the worker; then every rank validates
its share of the validation patients, and the metric counts are gathered so all ranks see the same
figures and take the same early-stopping decision. Rank 0 writes a checkpoint (a model artifact
plus the optimiser state) and the history; `ray.train.report` is called by every rank.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from brainseg_ray.compat import ensure_torchvision_importable

TRAINING_STATE_FILE = "training_state.pt"
CHECKPOINT_HISTORY_FILE = "history.json"
SCORE = "val_patient_dice"


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


def _write_checkpoint(folder: str, model, plan: dict, step, progress: dict, history: list[dict], metrics: dict) -> None:
    from brainseg_ray.models.artifact import save_artifact
    from brainseg_ray.models.registry import ModelSpec

    save_artifact(folder, model, ModelSpec(**plan["spec"]), normalisation=plan["normalisation"],
                  threshold=plan["config"]["threshold"], training=plan["training_record"],
                  data_fingerprint=plan["data_fingerprint"], metrics=metrics,
                  input_size=plan["config"]["image_size"])
    torch.save({**step.state_dict(), "progress": progress}, os.path.join(folder, TRAINING_STATE_FILE))
    with open(os.path.join(folder, CHECKPOINT_HISTORY_FILE), "w") as f:
        json.dump(history, f)


def train_loop_per_worker(plan: dict) -> dict:
    ensure_torchvision_importable()  # before smp/timm/torchvision are imported in this process
    import ray.train
    import ray.train.torch

    from brainseg_ray.data.augment import build_augmentation
    from brainseg_ray.data.crops import CropSampler
    from brainseg_ray.devices import resolve_precision
    from brainseg_ray.models.inputs import images_to_tensor, masks_to_tensor
    from brainseg_ray.models.registry import ModelSpec, build_model
    from brainseg_ray.storage import S3Options
    from brainseg_ray.train.history import write_history
    from brainseg_ray.train.losses import build_loss
    from brainseg_ray.train.metrics import SegmentationMetrics
    from brainseg_ray.train.steps import TrainStep, build_optimizer, build_schedule, validate

    cfg = plan["config"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker was given.
    torch.set_num_threads(plan["threads"])
    torch.manual_seed(cfg["seed"] * 1000 + rank)
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg["precision"], device)
    size, channels_last = cfg["image_size"], cfg["channels_last"]
    train_size = cfg["crop_size"] or size  # crops are cut at native resolution, never resized

    spec = ModelSpec(**plan["spec"])
    model = build_model(spec)
    if plan.get("init_state") is not None:  # init_from; a checkpoint restored below wins over it
        model.load_state_dict(plan["init_state"])
    optimizer = build_optimizer(model, cfg["lr"], cfg["weight_decay"])
    scheduler = build_schedule(optimizer, cfg["schedule"], cfg["lr"], plan["total_steps"], cfg["warmup_fraction"])
    loss_fn = build_loss(cfg["loss"])
    step = TrainStep(model, loss_fn, optimizer, device, precision, cfg["grad_clip"], scheduler)

    progress = {"epoch": 0, "step": 0, "best_score": None, "best_epoch": None, "bad_epochs": 0, "stopped_early": False}
    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    resumed_from = None
    if checkpoint is not None:
        progress, history = _restore(checkpoint, model, step)
        progress.setdefault("step", 0)
        resumed_from = progress["epoch"]
        if rank == 0:
            print(f"train: resuming after {_round_name(plan, resumed_from, progress['step'])} from {checkpoint.path}",
                  flush=True)

    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": plan["find_unused_parameters"]})
    step.model = model
    # Optimiser state restored above refers to the same parameter objects DDP now wraps.
    unwrapped = model.module if hasattr(model, "module") else model
    for group in optimizer.state.values():
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                group[key] = value.to(device)

    augment = build_augmentation(cfg["augmentation"], seed=cfg["seed"] * 1000 + rank)
    # Seeded by the resumed position too, so a resumed run does not replay the crops it saw.
    crop = (CropSampler(cfg["crop_size"], cfg["foreground_fraction"], seed=(cfg["seed"], rank, progress["step"]))
            if cfg["crop_size"] else None)
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    # Validation patients are dealt to ranks, so each patient's slices meet on one rank.
    my_val_patients = set(plan["val_patients"][rank::world])
    s3 = S3Options(**cfg["s3"])

    def shard_pass(index: int):
        return _arrow_batches(train_shard, cfg["batch_size"], drop_last=True,
                              local_shuffle_buffer_size=cfg["batch_size"] * 8,
                              local_shuffle_seed=cfg["seed"] * 100003 + index * 101 + rank, prefetch_batches=2)

    def endless_batches(first_pass: int):
        for index in itertools.count(first_pass):
            yield from shard_pass(index)

    # By steps: rounds of eval_every_steps drawn from pass after pass over the shard. By epochs:
    # one pass per round. Ranks hold equal shards, so they take the same number of steps.
    stream = endless_batches(progress["epoch"] + 1) if cfg["steps"] else None
    first_epoch = progress["epoch"] + 1
    for epoch in range(first_epoch, plan["rounds"] + 1):
        if progress["stopped_early"]:
            break
        started = time.perf_counter()
        loss_sum, samples, foreground = 0.0, 0, 0
        if stream is not None:
            batches = itertools.islice(stream, min(cfg["eval_every_steps"], plan["total_steps"] - progress["step"]))
        else:
            batches = shard_pass(epoch)
        for _, images, masks in batches:
            if crop is not None:
                images, masks, centred = crop(images, masks)
                foreground += int(centred.sum())
            images, masks = augment(images, masks)
            x = images_to_tensor(images, plan["normalisation"], train_size, device, channels_last)
            y = masks_to_tensor(masks, train_size, device)
            loss_sum += step(x, y) * len(images)
            samples += len(images)
            progress["step"] += 1
        train_seconds = time.perf_counter() - started

        started = time.perf_counter()

        def my_batches():
            for ids, images, masks in _arrow_batches(val_data, cfg["batch_size"]):
                keep = np.fromiter((p in my_val_patients for p in ids), bool, len(ids))
                yield [p for p, k in zip(ids, keep) if k], images[keep], masks[keep]

        # The bare module, not the DDP wrapper: DDP's forward broadcasts buffers (a collective), and
        # ranks validate different numbers of batches (whole patients are dealt out, so a rank may
        # have none), which left the rank with more batches waiting forever for the others.
        metrics, val_loss_sum, val_count = validate(
            unwrapped, my_batches(), loss_fn=loss_fn, normalisation=plan["normalisation"], size=size,
            device=device, precision=precision, channels_last=channels_last, threshold=cfg["threshold"])
        gathered = _gather((metrics, val_loss_sum, val_count, loss_sum, samples, train_seconds, foreground))
        merged = SegmentationMetrics()
        for other, *_ in gathered:
            merged.merge(other)
        summary = merged.compute()
        val_count_all = sum(g[2] for g in gathered)
        samples_all = sum(g[4] for g in gathered)
        slowest = max(g[5] for g in gathered)
        score = summary["patient_dice_mean"]

        improved = score is not None and (progress["best_score"] is None
                                          or score > progress["best_score"] + cfg["min_delta"])
        if improved:
            progress.update(best_score=score, best_epoch=epoch, bad_epochs=0)
        else:
            progress["bad_epochs"] += 1
        progress["epoch"] = epoch
        patience = cfg["early_stopping_patience"]
        progress["stopped_early"] = bool(patience and progress["bad_epochs"] >= patience and epoch < plan["rounds"])
        detection = summary["detection"]
        row = {
            "epoch": epoch,
            "step": progress["step"],
            "train_loss": sum(g[3] for g in gathered) / max(samples_all, 1),
            "val_loss": sum(g[1] for g in gathered) / max(val_count_all, 1),
            SCORE: score,
            "val_patient_dice_tumour": summary["patient_dice_mean_tumour"],
            "val_slice_dice": summary["slice_dice_mean"],
            "val_sensitivity": detection["sensitivity"],
            "val_specificity": detection["specificity"],
            "lr": optimizer.param_groups[0]["lr"],
            "train_samples": samples_all,
            **({"train_foreground_crops": sum(g[6] for g in gathered)} if crop is not None else {}),
            "train_seconds": round(slowest, 3),
            "train_samples_per_s": round(samples_all / slowest, 2) if slowest > 0 else None,
            "val_seconds": round(time.perf_counter() - started, 3),
            "is_best": improved,
        }
        history.append(row)
        report = {**row, "best_val_patient_dice": progress["best_score"], "best_epoch": progress["best_epoch"],
                  "stopped_early": progress["stopped_early"]}
        # Checkpoints are ranked by this score; a run with no validation figure ranks them last.
        report[SCORE] = score if score is not None else -1.0

        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="brainseg-ckpt-") as folder:
                _write_checkpoint(folder, unwrapped, plan, step, progress, history,
                                  metrics={"epoch": epoch, "validation": summary, "train_loss": row["train_loss"]})
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=f"epoch-{epoch:04d}")
            write_history(plan["out"], history, s3)
            best = progress["best_score"]
            print(f"train: {_round_name(plan, epoch, progress['step'])}: train loss {row['train_loss']:.4f}, "
                  f"val loss {row['val_loss']:.4f}, val per-patient Dice {_fmt(score)} "
                  f"(best {_fmt(best)} at epoch {progress['best_epoch']}), "
                  f"{samples_all} slices in {slowest:.1f} s", flush=True)
        else:
            ray.train.report(report, checkpoint=None)
    return {"resumed_from_epoch": resumed_from, "progress": progress, "epochs_in_history": len(history)}


def _round_name(plan: dict, epoch: int, step: int) -> str:
    if plan["config"]["steps"]:
        return f"step {step}/{plan['total_steps']}"
    return f"epoch {epoch}/{plan['rounds']}"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
