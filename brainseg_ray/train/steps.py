"""One optimisation step and one validation pass, shared by the Ray Train loop, lr-find and the
benchmark's plain loop, so that all three do exactly the same arithmetic."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from brainseg_ray.devices import autocast
from brainseg_ray.models.inputs import (images_to_tensor, logits_to_probabilities, masks_to_tensor, rescale_slices,
                                        without_slice_rescaling)
from brainseg_ray.train.metrics import SegmentationMetrics


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation weights get no weight decay (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


SCHEDULES = ("one_cycle", "cosine")
DEFAULT_WARMUP = {"one_cycle": 0.3, "cosine": 0.05}


def build_one_cycle(optimizer: torch.optim.Optimizer, lr: float, total_steps: int,
                    warmup_fraction: float = 0.3) -> torch.optim.lr_scheduler.OneCycleLR:
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 2),
                                               pct_start=warmup_fraction, div_factor=25.0, final_div_factor=1e4)


def build_cosine(optimizer: torch.optim.Optimizer, lr: float, total_steps: int,
                 warmup_fraction: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from lr/25 to lr over the first warmup_fraction of the steps, then a cosine
    down to lr/1000 at the last step (and there it stays)."""
    total = max(total_steps, 2)
    warmup = max(1, int(round(total * warmup_fraction)))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.04 + 0.96 * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        return 1e-3 + (1 - 1e-3) * 0.5 * (1.0 + math.cos(math.pi * progress))

    for group in optimizer.param_groups:
        group["lr"] = lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_schedule(optimizer: torch.optim.Optimizer, name: str, lr: float, total_steps: int,
                   warmup_fraction: float | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule `name` (one of SCHEDULES) over `total_steps` optimizer steps."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    warm = DEFAULT_WARMUP[name] if warmup_fraction is None else warmup_fraction
    builder = build_one_cycle if name == "one_cycle" else build_cosine
    return builder(optimizer, lr, total_steps, warm)


class TrainStep:
    """Forward under autocast, loss in fp32, backward, clip, optimiser and scheduler step."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, precision: str, grad_clip: float = 0.0,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.device, self.precision, self.grad_clip, self.scheduler = device, precision, grad_clip, scheduler
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.train()
        with autocast(self.precision, self.device):
            logits = self.model(x)
        loss = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # One-cycle refuses steps past its total; a resumed or longer epoch must not crash on it.
        total = getattr(self.scheduler, "total_steps", None)
        if self.scheduler is not None and (total is None or self.scheduler.last_epoch + 1 < total):
            self.scheduler.step()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else {},
                "scaler": self.scaler.state_dict() if self.scaler else {}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@torch.no_grad()
def training_batch(images: np.ndarray, masks: np.ndarray, *, normalisation: dict,
                   augment: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], size: int,
                   device: torch.device | str, channels_last: bool,
                   crop: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """uint8 slices [N,H,W,C] and masks [N,H,W] -> (x, y, crops centred near tumour), in the one
    order the training loop and lr-find share. Whole slices are rescaled first (normalisation
    "slice"), as inference sees them; then the crop; then the augmentation, whose brightness
    changes land on top of the common level."""
    images = rescale_slices(images, normalisation)
    centred = 0
    if crop is not None:
        images, masks, near_tumour = crop(images, masks)
        centred = int(near_tumour.sum())
    images, masks = augment(images, masks)
    x = images_to_tensor(images, without_slice_rescaling(normalisation), size, device, channels_last)
    return x, masks_to_tensor(masks, size, device), centred


@torch.no_grad()  # no autograd graph: validation's whole slices would hold every activation
def validate(model: nn.Module, batches: Iterable[tuple[list[str], np.ndarray, np.ndarray]], *, loss_fn: nn.Module,
             normalisation: dict, size: int, device: torch.device, precision: str, channels_last: bool,
             threshold: float) -> tuple[SegmentationMetrics, float, int]:
    """Metrics at the data's own resolution over (patient_ids, images, masks) batches, plus the
    summed loss (at the model's input size, as in training) and the number of slices."""
    model.eval()
    metrics, loss_sum, count = SegmentationMetrics(), 0.0, 0
    for patient_ids, images, masks in batches:
        if len(patient_ids) == 0:
            continue
        x = images_to_tensor(images, normalisation, size, device, channels_last)
        with autocast(precision, device):
            logits = model(x)
        y = masks_to_tensor(masks, size, device)
        loss_sum += float(loss_fn(logits.float(), y)) * len(patient_ids)
        count += len(patient_ids)
        probs = logits_to_probabilities(logits, masks.shape[1], masks.shape[2])
        metrics.update(patient_ids, (probs > threshold).cpu().numpy(), masks.astype(bool))
    return metrics, loss_sum, count
