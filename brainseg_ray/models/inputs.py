"""How uint8 slices become a model's input, and its output becomes a probability map.

One definition for training, lr-find, evaluation and the Segmenter, so that a model sees the
same numbers everywhere: x = (pixel / scale - mean) / std per channel, resized to the model's input
size, NCHW (channels_last when asked for). `normalisation` is the artifact's
{"scale": 255, "mean": [...], "std": [...]}, mean and std on the 0..1 scale.

With "slice_target" in it (training's `normalisation=slice`), each slice's channels are first
brought to a common brightness (rescale_slices): MRI intensities have no absolute scale, and the
LGG patients' FLAIR alone spans a factor of two between scanners.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_NORMALISATION = {"scale": 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
NORMALISATIONS = ("dataset", "slice")
# Per-slice rescaling (normalisation "slice"): each channel's 99th percentile over the brain lands
# on SLICE_TARGET, about the middle of the shared patients' FLAIR range (90-180).
SLICE_PERCENTILE = 99.0
SLICE_TARGET = 150.0
SLICE_FLOOR = 10  # uint8 values at or under it are the air around the head, not brain
SLICE_MIN_PIXELS = 256  # fewer brain pixels than this (a slice past the skull's end): left as it is
SLICE_GAINS = (0.5, 4.0)  # the factor's bounds: a nearly empty channel is not blown up into noise
SLICE_KEYS = ("slice_percentile", "slice_target")


def normalisation_from_profile(profile: dict | None, mode: str = "dataset") -> dict:
    """The ingest manifest's profile (its "channels" mean and std, 0..255 scale) as an artifact
    normalisation; the default when the statistics are unknown (an empty dataset). `mode` "slice"
    adds the per-slice rescaling (the profile's statistics are of raw slices; the model's first
    layer absorbs the small shift)."""
    if mode not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {mode!r}")
    channels = (profile or {}).get("channels") or {}
    mean = channels.get("mean") or [None]
    std = channels.get("std") or [None]
    if any(v is None for v in mean) or any(not v for v in std):
        norm = dict(DEFAULT_NORMALISATION)
    else:
        norm = {"scale": 255, "mean": [m / 255.0 for m in mean], "std": [s / 255.0 for s in std]}
    if mode == "slice":
        norm.update(slice_percentile=SLICE_PERCENTILE, slice_target=SLICE_TARGET)
    return norm


def normalisation_mode(normalisation: dict) -> str:
    """The training setting an artifact's `normalisation` came from: "slice" or "dataset" (the
    inverse of normalisation_from_profile's `mode`)."""
    return "slice" if normalisation.get("slice_target") else "dataset"


def rescale_slices(images: np.ndarray, normalisation: dict) -> np.ndarray:
    """uint8 [N,H,W,C] -> uint8 [N,H,W,C]. Where `normalisation` has a "slice_target", each channel
    of each slice is multiplied so that its "slice_percentile" over the pixels above SLICE_FLOOR
    lands on that target (0..255; the factor kept within SLICE_GAINS, brighter pixels clipped at
    255). A channel with fewer than SLICE_MIN_PIXELS such pixels, and every slice without the key,
    is returned unchanged."""
    target = normalisation.get("slice_target")
    if not target or len(images) == 0:
        return images
    fraction = float(normalisation.get("slice_percentile", SLICE_PERCENTILE)) / 100.0
    n, c = images.shape[0], images.shape[-1]
    # Each channel's histogram instead of a sort: the percentile of uint8 values is the first bin
    # whose running count passes its rank (the same value np.partition would pick), and the
    # rescaling is a 256-entry table per channel; together half the time of sorting and multiplying.
    counts = np.stack([np.bincount(images[i, ..., j].ravel(), minlength=256)
                       for i in range(n) for j in range(c)]).reshape(n, c, 256)
    counts[:, :, :SLICE_FLOOR + 1] = 0
    brain = counts.sum(axis=2)
    rank = np.rint(fraction * (brain - 1))
    percentile = np.argmax(counts.cumsum(axis=2) > rank[:, :, None], axis=2)
    enough = brain >= SLICE_MIN_PIXELS
    gains = np.ones((n, c), np.float32)
    gains[enough] = np.clip(float(target) / percentile[enough].astype(np.float64), *SLICE_GAINS)
    if (gains == 1.0).all():
        return images
    tables = np.clip(np.rint(np.arange(256, dtype=np.float32) * gains[:, :, None]), 0, 255).astype(np.uint8)
    out = np.empty_like(images)
    for i in range(n):
        for j in range(c):
            np.take(tables[i, j], images[i, ..., j], out=out[i, ..., j])
    return out


def without_slice_rescaling(normalisation: dict) -> dict:
    """`normalisation` for slices already passed through rescale_slices (training rescales whole
    slices before it crops and augments them)."""
    return {k: v for k, v in normalisation.items() if k not in SLICE_KEYS}


def images_to_tensor(images: np.ndarray, normalisation: dict, size: int, device: torch.device | str = "cpu",
                     channels_last: bool = False) -> torch.Tensor:
    """uint8 [N,H,W,C] -> float32 [N,C,size,size], normalised (bilinear resize when H,W != size)."""
    images = rescale_slices(images, normalisation)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float()
    scale = float(normalisation.get("scale", 255))
    mean = torch.tensor(normalisation["mean"], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(normalisation["std"], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    x = (x / scale - mean) / std
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def masks_to_tensor(masks: np.ndarray, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 {0,1} [N,H,W] -> float32 [N,1,size,size] (nearest resize keeps it binary)."""
    y = torch.from_numpy(np.ascontiguousarray(masks)).to(device, non_blocking=True).unsqueeze(1).float()
    if y.shape[-2:] != (size, size):
        y = F.interpolate(y, size=(size, size), mode="nearest")
    return y


def logits_to_probabilities(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N,1,h,w] logits -> float32 [N,height,width] probabilities (upsampled before the sigmoid,
    so the decision boundary is interpolated, not the blocky thresholded mask)."""
    logits = logits.float()
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits[:, 0])


def normalisation_text(normalisation: dict) -> str:
    """One line on what `normalisation` does, for model cards and reports."""
    text = "per channel, the training data's mean and std"
    if normalisation.get("slice_target"):
        text = (f"each slice's channels first scaled so that their {normalisation['slice_percentile']:g}th "
                f"percentile over the brain is {normalisation['slice_target']:g} of 255; then {text}")
    return text
