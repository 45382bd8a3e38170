"""The learning-rate range test behind `brainseg lr-find` (Leslie Smith's test, as fastai's lr_find).

A freshly built model trains on random batches of the training patients' labelled slices (never
the validation patients': the same choice of patients as `brainseg train`), with the learning
rate growing exponentially from `start_lr` to `end_lr`, one step per learning rate. The raw loss
and an exponentially smoothed one (beta 0.98, bias-corrected) are recorded; the test stops early
once the smoothed loss exceeds 4x its minimum or the loss is not finite (the run diverged).

Two suggestions are read off the smoothed curve:

    steepest        the LR where the loss falls fastest: the most negative slope of the smoothed
                    loss against log10(LR), ignoring the first 10% of the points (the smoothing's
                    warm-up); `suggested_lr`.
    min_loss_div10  the LR of the lowest smoothed loss, divided by 10 (the fallback when too few
                    points were recorded, or the loss never fell).

It runs in this process (no Ray), on a GPU when one is visible. The model is a probe: its weights
are thrown away. OUT/lr_find.json holds the curve and the suggestions, OUT/lr_find.png the plot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from brainseg_ray import storage
from brainseg_ray.config import ConfigError, LrFindConfig, TrainConfig
from brainseg_ray.plotting import new_figure, png_bytes
from brainseg_ray.train.trainer import TrainingError

LR_FIND_JSON = "lr_find.json"
LR_FIND_PNG = "lr_find.png"
BETA = 0.98  # smoothing of the loss (fastai's value)
DIVERGENCE_FACTOR = 4.0  # stop once the smoothed loss exceeds this times its minimum
MIN_STEPS = 10
SKIP_START_FRACTION = 0.1  # the first points of the smoothed curve are its warm-up
MIN_POINTS_FOR_STEEPEST = 5  # points left after skipping, for the slope to mean anything
_COLUMNS = ["patient_id", "slice_index", "image", "mask", "labelled"]


@dataclass
class LrFindResult:
    out: str
    suggested_lr: float
    steepest: float | None  # None: too few points, or the smoothed loss never fell
    min_loss_div10: float
    steps_run: int
    stopped_early: bool
    json_uri: str
    png_uri: str

    def summary_line(self) -> str:
        if self.steepest is not None:
            how = f"steepest descent; min-loss/10 {self.min_loss_div10:.1e}"
        else:
            how = "min-loss/10; no steepest descent to read from so few points"
        return f"lr-find: {self.steps_run} steps, suggested lr {self.suggested_lr:.1e} ({how}) -> {self.png_uri}"


def lr_schedule(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """`steps` learning rates from start_lr to end_lr (both included), evenly spaced in log."""
    return start_lr * (end_lr / start_lr) ** (np.arange(steps) / (steps - 1))


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Exponential moving average of `losses`, bias-corrected (the first value is the first loss)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1.0 - beta) * loss
        out.append(average / (1.0 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float], start_lr: float) -> tuple[float | None, float]:
    """(steepest, min_loss_div10) from a recorded curve; see the module docstring.

    min_loss_div10 is never below start_lr: a learning rate below the tested range is not one
    this test can recommend."""
    if not lrs:
        raise ValueError("no points recorded")
    lrs_a, smoothed_a = np.asarray(lrs, float), np.asarray(smoothed, float)
    min_loss_div10 = max(float(lrs_a[int(np.argmin(smoothed_a))]) / 10.0, start_lr)
    skip = max(1, int(len(lrs_a) * SKIP_START_FRACTION))
    if len(lrs_a) - skip < MIN_POINTS_FOR_STEEPEST:
        return None, min_loss_div10
    slopes = np.gradient(smoothed_a, np.log10(lrs_a))[skip:]
    best = int(np.argmin(slopes))
    if not slopes[best] < 0:
        return None, min_loss_div10
    return float(lrs_a[skip + best]), min_loss_div10


def _check(cfg: LrFindConfig) -> tuple[TrainConfig, str]:
    """The train config to use and the out folder; user mistakes raise with a clear message."""
    from brainseg_ray.train.trainer import _check_config

    train = cfg.train
    out = cfg.out or train.out
    if not train.data:
        raise TrainingError("lr-find needs data (an ingested dataset: --data or train.data)")
    if not out:
        raise ConfigError("lr-find needs an out folder (--out, or train.out)")
    if not (math.isfinite(cfg.start_lr) and cfg.start_lr > 0):
        raise ConfigError(f"start_lr must be a positive number, got {cfg.start_lr}")
    if not (math.isfinite(cfg.end_lr) and cfg.end_lr > cfg.start_lr):
        raise ConfigError(f"end_lr ({cfg.end_lr}) must be larger than start_lr ({cfg.start_lr})")
    if cfg.steps < MIN_STEPS:
        raise ConfigError(f"steps must be at least {MIN_STEPS}, got {cfg.steps}")
    train = dataclasses.replace(train, out=out)
    _check_config(train)  # model, loss, augmentation, precision, image_size, batch_size
    return train, out


def _load_training_slices(cfg: TrainConfig) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(training patients, images [N,H,W,3], masks [N,H,W]): their labelled slices, in memory."""
    import pyarrow.compute as pc

    from brainseg_ray.data import schema
    from brainseg_ray.data.tables import decode_tensor, read_slices_table, tumour_slices_by_patient
    from brainseg_ray.train.trainer import choose_patients

    train_patients, _, _ = choose_patients(cfg, tumour_slices_by_patient(cfg.data, cfg.s3))
    table = read_slices_table(cfg.data, cfg.s3, columns=_COLUMNS, filters=[("patient_id", "in", train_patients)])
    table = table.filter(pc.fill_null(table.column("labelled"), False))
    if table.num_rows < cfg.batch_size:
        raise TrainingError(f"the {len(train_patients)} training patients have {table.num_rows} labelled slices, "
                            f"fewer than batch_size {cfg.batch_size}; lower batch_size")
    return (train_patients, decode_tensor(table.column("image"), schema.IMAGE_SHAPE),
            decode_tensor(table.column("mask"), schema.MASK_SHAPE))


def _threads() -> int:
    """All of this machine's CPUs, unless OMP_NUM_THREADS says otherwise (a shared or busy machine,
    or a Ray task given fewer CPUs: oversubscribed OpenMP threads wait on each other)."""
    try:
        wanted = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        wanted = 0
    return wanted if wanted > 0 else (os.cpu_count() or 1)


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Index batches drawn at random: passes over a fresh permutation, the remainder dropped."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield np.sort(order[start : start + batch_size])


def plot_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggested_lr: float,
                 steepest: float | None, min_loss_div10: float) -> bytes:
    """Smoothed loss (and the raw loss, faint) against the LR on a log axis, as PNG bytes."""
    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    ax.plot(lrs, losses, color="tab:blue", alpha=0.25, linewidth=1, label="loss")
    ax.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    ax.set_xscale("log")
    y = float(np.interp(np.log10(suggested_lr), np.log10(lrs), smoothed))
    how = "steepest descent" if steepest is not None else "min-loss/10"
    ax.axvline(suggested_lr, color="tab:red", linestyle="--", alpha=0.6)
    ax.plot([suggested_lr], [y], "o", color="tab:red", markersize=8, label=f"suggested {suggested_lr:.1e} ({how})")
    if steepest is not None:
        ax.axvline(min_loss_div10, color="grey", linestyle=":", label=f"min-loss/10 {min_loss_div10:.1e}")
    # Framed on the smoothed curve: a raw loss of a diverging step would flatten everything else.
    low, high = min(smoothed), max(smoothed)
    margin = 0.15 * (high - low) or 0.05 * abs(high) or 0.05
    ax.set_ylim(low - margin, high + margin)
    ax.set(title="learning-rate range test", xlabel="learning rate (log scale)", ylabel="training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return png_bytes(fig)


def lr_find(cfg: LrFindConfig) -> LrFindResult:
    """Run the range test on cfg.train's data, model and optimiser settings; write OUT/lr_find.json
    and OUT/lr_find.png (OUT: cfg.out, else cfg.train.out)."""
    import torch

    from brainseg_ray.compat import ensure_torchvision_importable
    from brainseg_ray.data.augment import build_augmentation
    from brainseg_ray.devices import pick_device, resolve_precision
    from brainseg_ray.models.inputs import normalisation_from_profile
    from brainseg_ray.models.registry import build_model
    from brainseg_ray.train.losses import build_loss
    from brainseg_ray.train.steps import TrainStep, build_optimizer, training_batch
    from brainseg_ray.train.trainer import model_spec, read_manifest

    train, out = _check(cfg)
    device = pick_device(train.use_gpu)
    precision = resolve_precision(train.precision, device)
    manifest = read_manifest(train.data, train.s3)
    normalisation = normalisation_from_profile(manifest.get("profile"), train.normalisation)
    train_patients, images, masks = _load_training_slices(train)
    print(f"lr-find: {train.model} on {len(train_patients)} training patients ({len(images)} slices), "
          f"lr {cfg.start_lr:.1e} -> {cfg.end_lr:.1e} over {cfg.steps} steps on {device.type} ({precision})",
          flush=True)

    lrs_planned = lr_schedule(cfg.start_lr, cfg.end_lr, cfg.steps)
    lrs, losses, smoothed = [], [], []
    stop_reason = None
    threads = torch.get_num_threads()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    ensure_torchvision_importable()  # before smp/timm/torchvision are imported
    try:
        torch.set_num_threads(_threads())
        with torch.random.fork_rng(devices=fork_devices):  # seeded here, the caller's RNG left alone
            torch.manual_seed(train.seed)
            model = build_model(model_spec(train)).to(device)
            if train.channels_last:
                model = model.to(memory_format=torch.channels_last)
            optimizer = build_optimizer(model, cfg.start_lr, train.weight_decay)
            step = TrainStep(model, build_loss(train.loss), optimizer, device, precision, train.grad_clip)
            augment = build_augmentation(train.augmentation, seed=train.seed)
            batches = _batches(len(images), train.batch_size, np.random.default_rng(train.seed))
            average, best = 0.0, math.inf
            for lr in lrs_planned:
                lr = float(lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                index = next(batches)
                x, y, _ = training_batch(images[index], masks[index], normalisation=normalisation, augment=augment,
                                         size=train.image_size, device=device, channels_last=train.channels_last)
                loss = step(x, y)
                if not math.isfinite(loss):
                    stop_reason = f"loss not finite at lr {lr:.1e}"
                    break
                lrs.append(lr)
                losses.append(loss)
                average = BETA * average + (1.0 - BETA) * loss
                smoothed.append(average / (1.0 - BETA ** len(losses)))  # as smooth(losses)
                best = min(best, smoothed[-1])
                if smoothed[-1] > DIVERGENCE_FACTOR * best:
                    stop_reason = f"smoothed loss above {DIVERGENCE_FACTOR:g}x its minimum at lr {lr:.1e}"
                    break
            del model, optimizer, step  # a probe: its weights are not kept
    finally:
        torch.set_num_threads(threads)
    if not lrs:
        raise TrainingError(f"lr-find: the first step already diverged ({stop_reason}); lower start_lr")

    steepest, min_loss_div10 = suggest(lrs, smoothed, cfg.start_lr)
    suggested_lr = steepest if steepest is not None else min_loss_div10
    stopped_early = stop_reason is not None
    record = {
        "lrs": lrs,
        "losses": losses,
        "smoothed": smoothed,
        "suggested_lr": suggested_lr,
        "steepest": steepest,
        "min_loss_div10": min_loss_div10,
        "stopped_early": stopped_early,
        "stop_reason": stop_reason,
        "model": train.model,
        "batch_size": train.batch_size,
        "image_size": train.image_size,
        "steps_run": len(lrs),
        "train_patients": train_patients,
        "train_slices": int(len(images)),
        "start_lr": cfg.start_lr,
        "end_lr": cfg.end_lr,
        "steps": cfg.steps,
        "seed": train.seed,
        "loss": train.loss,
        "augmentation": train.augmentation,
        "weight_decay": train.weight_decay,
        "grad_clip": train.grad_clip,
        "precision": precision,
        "device": device.type,
        "data": train.data,
    }
    storage.makedirs(out, train.s3)
    json_uri, png_uri = storage.join(out, LR_FIND_JSON), storage.join(out, LR_FIND_PNG)
    storage.write_bytes(json_uri, json.dumps(record, indent=1).encode(), train.s3)
    storage.write_bytes(png_uri, plot_lr_find(lrs, losses, smoothed, suggested_lr, steepest, min_loss_div10),
                        train.s3)
    return LrFindResult(out=out, suggested_lr=suggested_lr, steepest=steepest, min_loss_div10=min_loss_div10,
                        steps_run=len(lrs), stopped_early=stopped_early, json_uri=json_uri, png_uri=png_uri)
