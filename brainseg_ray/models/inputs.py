"""How uint8 slices become a model's input, and its output becomes a probability map.

One definition for training, lr-find, evaluation and the Segmenter, so that a model sees the
same numbers everywhere: x = (pixel / scale - mean) / std per channel, resized to the model's input
size, NCHW (channels_last when asked for). `normalisation` is the artifact's
{"scale": 255, "mean": [...], "std": [...]}, mean and std on the 0..1 scale.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_NORMALISATION = {"scale": 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def normalisation_from_profile(profile: dict | None) -> dict:
    """The ingest manifest's profile (its "channels" mean and std, 0..255 scale) as an artifact
    normalisation; the default when the statistics are unknown (an empty dataset)."""
    channels = (profile or {}).get("channels") or {}
    mean = channels.get("mean") or [None]
    std = channels.get("std") or [None]
    if any(v is None for v in mean) or any(not v for v in std):
        return dict(DEFAULT_NORMALISATION)
    return {"scale": 255, "mean": [m / 255.0 for m in mean], "std": [s / 255.0 for s in std]}


def images_to_tensor(images: np.ndarray, normalisation: dict, size: int, device: torch.device | str = "cpu",
                     channels_last: bool = False) -> torch.Tensor:
    """uint8 [N,H,W,C] -> float32 [N,C,size,size], normalised (bilinear resize when H,W != size)."""
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
