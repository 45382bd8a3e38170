"""Training losses for binary FLAIR-lesion segmentation.

Every loss takes raw logits [N,1,H,W] (no sigmoid applied) and float targets of the same shape
holding 0 or 1, and returns a scalar tensor. Target values are not checked (that would cost a
device sync per step); masks from the ingested dataset are already {0,1}.

    bce        nn.BCEWithLogitsLoss, mean over all pixels
    dice       soft Dice on sigmoid probabilities, per slice then averaged over the batch
    bce_dice   bce_weight * bce + (1 - bce_weight) * dice  (the default)
    focal      binary focal loss on logits (Lin et al. 2017), mean over all pixels

`per_slice_bce_dice` gives evaluation the same two terms for each slice, from probabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BCEDiceLoss", "DiceLoss", "FocalLoss", "LOSSES", "DEFAULT_LOSS", "build_loss", "per_slice_bce_dice",
           "soft_dice"]


def _check_shapes(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} does not match targets {tuple(targets.shape)}"
        )
    if logits.dim() < 2:
        raise ValueError(f"expected [N,1,H,W] logits, got shape {tuple(logits.shape)}")


def soft_dice(probs: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice of each sample [N,...] -> [N]: (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)."""
    probs = probs.flatten(1)
    targets = targets.to(probs.dtype).flatten(1)
    intersection = (probs * targets).sum(dim=1)
    denominator = probs.sum(dim=1) + targets.sum(dim=1)
    return (2 * intersection + smooth) / (denominator + smooth)


class DiceLoss(nn.Module):
    """1 - soft Dice, computed per sample (slice) and then averaged over the batch.

    Per sample rather than over the whole batch so that every slice counts equally: a batch-wide
    Dice lets one large lesion drown the small ones. `smooth` (> 0) is added to numerator and
    denominator, which keeps a slice with an empty target finite: its loss is
    1 - smooth / (sum(p) + smooth), near 0 when nothing is predicted and rising towards 1 with
    every false-positive probability. Perfect logits give ~0, inverted logits ~1.
    """

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0 (it keeps empty slices finite), got {smooth}")
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, targets)
        return (1 - soft_dice(torch.sigmoid(logits), targets, self.smooth)).mean()


class BCEDiceLoss(nn.Module):
    """bce_weight * BCE-with-logits + (1 - bce_weight) * DiceLoss(smooth).

    BCE gives dense per-pixel gradients early in training; Dice counters the heavy
    background/lesion imbalance. bce_weight must lie in [0, 1].
    """

    def __init__(self, bce_weight: float = 0.5, smooth: float = 1.0):
        super().__init__()
        if not 0.0 <= bce_weight <= 1.0:
            raise ValueError(f"bce_weight must be in [0, 1], got {bce_weight}")
        self.bce_weight = float(bce_weight)
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(smooth=smooth)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, targets)
        targets = targets.to(logits.dtype)
        return self.bce_weight * self.bce(logits, targets) + (1 - self.bce_weight) * self.dice(
            logits, targets
        )


class FocalLoss(nn.Module):
    """Binary focal loss on logits: mean of alpha_t * (1 - p_t)**gamma * BCE(logit, target).

    BCE comes from `binary_cross_entropy_with_logits` (stable for large logits), p_t = exp(-BCE)
    is the probability given to the true class, and 1 - p_t is taken as -expm1(-BCE) so it stays
    accurate (and its gradient finite) for confident pixels.

    alpha weights lesion pixels by alpha and background by 1 - alpha; alpha=None disables the
    weighting. Hence gamma=0, alpha=None is exactly BCE, and gamma=0, alpha=0.5 is exactly
    0.5 * BCE (both classes weighted equally). gamma must be >= 0, alpha in [0, 1] or None.
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0):
        super().__init__()
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.alpha = None if alpha is None else float(alpha)
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, targets)
        targets = targets.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        loss = bce
        if self.gamma != 0:
            loss = (-torch.expm1(-bce)) ** self.gamma * loss
        if self.alpha is not None:
            loss = (self.alpha * targets + (1 - self.alpha) * (1 - targets)) * loss
        return loss.mean()


def per_slice_bce_dice(probabilities: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The bce_dice loss of each slice, from probabilities [N,H,W] and {0,1} truth: float64 [N].

    For evaluation, which holds probabilities (after TTA, at the slice's size) rather than logits,
    and ranks its worst slices by this. Both terms weigh 1 (BCEDiceLoss weighs them 0.5 each);
    probabilities are clipped to [1e-7, 1 - 1e-7] so a confident miss stays finite. In float64,
    so the ranking does not depend on the device the probabilities came from.
    """
    p = torch.from_numpy(np.clip(np.asarray(probabilities, np.float64), 1e-7, 1 - 1e-7))
    t = torch.from_numpy(np.asarray(truth, np.float64))
    bce = F.binary_cross_entropy(p, t, reduction="none").flatten(1).mean(dim=1)
    return (bce + (1 - soft_dice(p, t))).numpy()


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "bce_dice": BCEDiceLoss,
    "dice": DiceLoss,
    "focal": FocalLoss,
    "bce": nn.BCEWithLogitsLoss,
}
DEFAULT_LOSS = "bce_dice"


def build_loss(name: str = DEFAULT_LOSS, **kwargs) -> nn.Module:
    """The loss registered as `name` (see LOSSES), built with `kwargs`.

    Unknown names raise ValueError listing the known ones; bad keyword arguments raise the
    constructor's own TypeError/ValueError.
    """
    try:
        factory = LOSSES[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(LOSSES))
        raise ValueError(f"unknown loss {name!r}; known losses: {known}") from None
    return factory(**kwargs)
