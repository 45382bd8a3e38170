"""Drawing slices and masks as pictures: the FLAIR channel contrast-stretched, a mask outlined or
tinted on it, and PNG bytes. The segment job's overlay files, Serve's overlay and mask PNGs and the
evaluation report's gallery all take the FLAIR channel from here.

numpy and Pillow only (no torch, no matplotlib); inputs are never modified in place. Images are
uint8 [H,W,3] with channels (pre-contrast, FLAIR, post-contrast); masks are {0,1} [H,W] (bool or
numeric, see brainseg_ray.masks).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from brainseg_ray.data.schema import FLAIR_CHANNEL
from brainseg_ray.masks import as_mask

__all__ = ["OVERLAY_STYLES", "encode_png", "flair_channel", "inner_boundary", "mask_png", "overlay", "stretch_flair"]

OVERLAY_STYLES = ("outline", "tint")


def flair_channel(image: np.ndarray) -> np.ndarray:
    """The FLAIR channel of an [H,W,3] slice (an [H,W] image is taken as FLAIR already, and a
    single-channel [H,W,1] one as its only channel)."""
    image = np.asarray(image)
    if image.ndim == 3:
        return image[..., FLAIR_CHANNEL] if image.shape[-1] > FLAIR_CHANNEL else image[..., 0]
    if image.ndim == 2:
        return image
    raise ValueError(f"slice image must be [H,W,3] or [H,W], got shape {image.shape}")


def _percentiles_u8(values: np.ndarray, qs: Sequence[float]) -> list[float]:
    """``np.percentile(values, qs)`` (linear method) for uint8 data, through a histogram.

    A 256-bin histogram and its cumulative sum give the k-th smallest value in O(n) without a
    sort; interpolation follows numpy's default exactly.
    """
    flat = values.ravel()
    cumulative = np.cumsum(np.bincount(flat, minlength=256))
    n = flat.size
    out = []
    for q in qs:
        position = q / 100.0 * (n - 1)
        k = int(math.floor(position))
        frac = position - k
        below = int(np.searchsorted(cumulative, k, side="right"))  # k-th smallest value (0-based)
        above = int(np.searchsorted(cumulative, min(k + 1, n - 1), side="right"))
        out.append(below + frac * (above - below))
    return out


def stretch_flair(image: np.ndarray) -> np.ndarray:
    """FLAIR channel contrast-stretched to 0..255 between its 1st and 99th percentiles.

    When those percentiles coincide (e.g. a mostly-constant slice) the min/max range is used;
    when the slice is constant, its grey values are returned unchanged (no division by zero).
    """
    grey = flair_channel(image)
    if grey.size == 0:
        return grey.copy()
    lo, hi = _percentiles_u8(grey, (1.0, 99.0))
    if hi <= lo:
        lo, hi = float(grey.min()), float(grey.max())
        if hi <= lo:
            return grey.copy()
    lut = np.clip((np.arange(256, dtype=np.float64) - lo) * (255.0 / (hi - lo)), 0.0, 255.0)
    return np.rint(lut).astype(np.uint8)[grey]


def inner_boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (the image border counts as outside)."""
    padded = np.pad(mask, 1)
    interior = (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def overlay(image: np.ndarray, mask: np.ndarray, style: str = "outline",
            color: Sequence[int] = (255, 0, 0), alpha: float = 0.4) -> np.ndarray:
    """Draw a mask on the slice's FLAIR channel.

    The background is the FLAIR channel (1) as grey, contrast-stretched per slice so its 1st and
    99th percentiles map to 0 and 255 (clipped outside). If the percentiles coincide the
    min/max range is used; a constant slice keeps its grey value unchanged.

    Args:
        image: uint8 [H,W,3].
        mask: {0,1} [H,W] (bool or numeric).
        style: "outline": the mask's inner boundary (mask pixels with a 4-neighbour outside the
            mask or outside the image; a 1-px line) is painted ``color`` and everything else
            stays grey. "tint": mask pixels become ``round((1 - alpha) * grey + alpha * color)``.
        color: RGB, three integers in 0..255.
        alpha: tint opacity in [0,1]; ignored by "outline".

    Returns:
        A new uint8 [H,W,3] array.

    Raises:
        ValueError: unknown style (lists outline, tint), image not uint8 [H,W,3], mask shape not
            [H,W] or not {0,1}, a bad color or alpha.
    """
    if style not in OVERLAY_STYLES:
        raise ValueError(f"unknown overlay style {style!r}; expected one of: {', '.join(OVERLAY_STYLES)}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H,W,3], got {image.dtype} {image.shape}")
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask must be [H,W] = {image.shape[:2]}, got {mask.shape}")
    binary = as_mask(mask, "mask")
    rgb = tuple(int(c) for c in color)
    if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
        raise ValueError(f"color must be three integers in 0..255, got {color!r}")
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    grey = stretch_flair(image)
    out = np.repeat(grey[..., None], 3, axis=2)
    if style == "outline":
        out[inner_boundary(binary)] = rgb
    else:
        under = grey[binary].astype(np.float32)[:, None]
        blended = (1.0 - alpha) * under + alpha * np.asarray(rgb, np.float32)
        out[binary] = np.rint(blended).astype(np.uint8)
    return out


def encode_png(array: np.ndarray) -> bytes:
    """uint8 [H,W] (greyscale) or [H,W,3] (RGB) -> PNG bytes (Pillow, compress_level=1).

    Raises:
        ValueError: another dtype or shape.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"PNG input must be uint8 [H,W] or [H,W,3], got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """{0,1} mask [H,W] -> greyscale PNG with 0 and 255.

    Raises:
        ValueError: not 2-D or not {0,1}.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H,W], got shape {mask.shape}")
    return encode_png(as_mask(mask, "mask").astype(np.uint8) * np.uint8(255))
