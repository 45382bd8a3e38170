"""Random square crops at native resolution for training, some of them centred near tumour.

A slice is 256x256 and a lesion often a few hundred pixels, so most of a whole slice teaches the
model "background". Training on crops (nnU-Net's patches) makes each step cheaper and, with a share
of crops centred near tumour pixels (nnU-Net's foreground oversampling, 0.33 there), puts lesion
borders in far more of the batches at the same compute. Validation, evaluation and inference
always see whole slices: a fully convolutional model applies to any size.

Per batch of N slices, N * foreground_fraction crops (rounded up or down at random, so the share
holds on average) are foreground crops: each takes a
tumour slice of the batch (drawn with replacement) and centres on one of its tumour pixels, moved
by up to `crop_size // 3` pixels so that the lesion is not always in the middle. The other crops
take the batch's slices in order at uniformly random positions. A batch without tumour slices
draws its foreground crops from the last `reservoir` tumour slices of earlier batches, so the
realised share stays at foreground_fraction (only batches before the first tumour slice get
random crops only). Crops always lie inside the slice (no padding); image and mask are cut with
the same window.
"""

from __future__ import annotations

import numpy as np


class CropSampler:
    """Cuts one crop per slice of a batch; build once per worker with its own seed."""

    def __init__(self, crop_size: int, foreground_fraction: float = 0.33, seed=None, reservoir: int = 16):
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must lie in [0, 1], got {foreground_fraction}")
        self.crop_size = crop_size
        self.foreground_fraction = foreground_fraction
        self.jitter = crop_size // 3
        self.rng = np.random.default_rng(seed)
        self.reservoir = reservoir
        self._kept: list[tuple[np.ndarray, np.ndarray]] = []  # recent tumour slices (image, mask)

    def __repr__(self) -> str:
        return f"CropSampler(crop_size={self.crop_size}, foreground_fraction={self.foreground_fraction})"

    def __call__(self, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images uint8 [N,H,W,C], masks [N,H,W] -> (images [N,c,c,C], masks [N,c,c], foreground
        [N] bool: which crops were centred near tumour)."""
        n, height, width = masks.shape
        c = self.crop_size
        if images.shape[:3] != masks.shape:
            raise ValueError(f"images {images.shape} and masks {masks.shape} do not pair up")
        if c > height or c > width:
            raise ValueError(f"crop_size {c} is larger than the {height}x{width} slices")
        tumour = np.flatnonzero(masks.reshape(n, -1).any(axis=1)) if n else np.zeros(0, int)
        pool = [(images[i], masks[i]) for i in tumour] or self._kept
        # Rounded up or down at random in proportion, so the share is exact on average.
        wanted = n * self.foreground_fraction
        n_foreground = int(wanted) + int(self.rng.random() < wanted - int(wanted)) if pool else 0
        foreground = np.zeros(n, bool)
        foreground[self.rng.permutation(n)[:n_foreground]] = True
        out_images = np.empty((n, c, c) + images.shape[3:], images.dtype)
        out_masks = np.empty((n, c, c), masks.dtype)
        for i in range(n):
            if foreground[i]:
                image, mask = pool[int(self.rng.integers(len(pool)))]
                ys, xs = np.nonzero(mask)
                pick = int(self.rng.integers(len(ys)))
                shift = self.rng.integers(-self.jitter, self.jitter + 1, size=2)
                top = int(np.clip(ys[pick] + shift[0] - c // 2, 0, height - c))
                left = int(np.clip(xs[pick] + shift[1] - c // 2, 0, width - c))
            else:
                image, mask = images[i], masks[i]
                top = int(self.rng.integers(height - c + 1))
                left = int(self.rng.integers(width - c + 1))
            out_images[i] = image[top:top + c, left:left + c]
            out_masks[i] = mask[top:top + c, left:left + c]
        if len(tumour) and self.reservoir:
            self._kept = (self._kept + [(images[i].copy(), masks[i].copy()) for i in tumour])[-self.reservoir:]
        return out_images, out_masks, foreground
