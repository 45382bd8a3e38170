"""Pure post-processing of predicted probability maps: masks and findings (drawing them is
brainseg_ray/rendering.py's job).

Everything here is numpy/scipy only (no torch, no Ray), deterministic, and free of side
effects: inputs are never modified in place. The Segmenter combines these functions with a
Predictor, for the bulk Ray Data job and for the Serve endpoint alike.

Conventions shared by every function:

* A batch of probabilities is float [N,H,W] (a single slice [H,W] where stated); masks are
  uint8 {0,1} of the same shape. Mask inputs may also be bool or any integer/float dtype holding
  only 0 and 1; anything else (0/255 masks, probabilities) is rejected with ValueError, because
  binarising it silently would hide a missing threshold step.
* Bounding boxes are (x0, y0, x1, y1) in pixel indices with x = column and y = row; x0/y0 are
  inclusive and x1/y1 EXCLUSIVE, like Python slices: ``mask[y0:y1, x0:x1]`` is the box.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from brainseg_ray.masks import as_mask

__all__ = [
    "Findings",
    "PostprocessOptions",
    "binarize",
    "findings",
    "keep_largest_component_3d",
    "remove_faint_components",
    "patient_volume_mm3",
    "postprocess",
    "remove_small_components",
]

# 8-connectivity inside each slice and no connection across slices: one ndimage.label call labels
# the 2-D components of every slice of a [N,H,W] stack at once.
_PER_SLICE_8 = np.zeros((3, 3, 3), dtype=bool)
_PER_SLICE_8[1] = True
_FULL_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class PostprocessOptions:
    """How probability maps become masks.

    Args:
        threshold: a pixel is tumour when its probability is strictly greater than this.
        min_component_px: drop 2-D connected components (8-connectivity) with fewer pixels than
            this; components of exactly this size are kept. 0 or 1 disables the step.
        min_component_peak: drop 2-D connected components whose highest probability is below
            this (faint, uncertain specks); a component reaching exactly this is kept. 0 disables
            it. Works on one slice alone, so Serve applies it too.
        largest_component_3d: per patient, keep only the largest 3-D connected component
            (26-connectivity) of the patient's slices stacked in slice_index order.
        keep_3d_fraction: with largest_component_3d, keep every 3-D component of at least this
            fraction of the largest one's voxels (multifocal lesions); 1.0 keeps the largest only.
        pixel_spacing_mm: in-plane pixel size (both axes), for areas and volumes.
        slice_thickness_mm: slice thickness, for volumes.

    Raises:
        ValueError: threshold not finite, min_component_px negative or not an integer,
            min_component_peak outside [0, 1], keep_3d_fraction outside (0, 1], or a
            spacing/thickness that is not a positive finite number.
    """

    threshold: float = 0.5
    min_component_px: int = 0
    min_component_peak: float = 0.0
    largest_component_3d: bool = False
    keep_3d_fraction: float = 1.0
    pixel_spacing_mm: float = 1.0
    slice_thickness_mm: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold!r}")
        if isinstance(self.min_component_px, bool) or not isinstance(self.min_component_px, (int, np.integer)) \
                or self.min_component_px < 0:
            raise ValueError(f"min_component_px must be a non-negative integer, got {self.min_component_px!r}")
        if not 0.0 <= self.min_component_peak <= 1.0:
            raise ValueError(f"min_component_peak must lie in [0, 1], got {self.min_component_peak!r}")
        if not 0.0 < self.keep_3d_fraction <= 1.0:
            raise ValueError(f"keep_3d_fraction must lie in (0, 1], got {self.keep_3d_fraction!r}")
        _check_positive("pixel_spacing_mm", self.pixel_spacing_mm)
        _check_positive("slice_thickness_mm", self.slice_thickness_mm)


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_ndim(array: np.ndarray, ndims: tuple[int, ...], name: str, layout: str) -> None:
    if array.ndim not in ndims:
        raise ValueError(f"{name} must be {layout}, got shape {array.shape}")


# --------------------------------------------------------------------------------------- masks


def binarize(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Probabilities -> uint8 {0,1} masks: 1 where probability > threshold (strictly).

    Args:
        probabilities: float [N,H,W] or [H,W] (any shape works; the output has the same shape).
        threshold: compared in the probabilities' own float dtype, so a float32 map and a
            threshold given as a Python float or a numpy float64 give the same answer (a pixel
            equal to float32(threshold) is background). This matches ``Predictor.masks``.

    Returns:
        A new uint8 array. NaN probabilities become 0.
    """
    probabilities = np.asarray(probabilities)
    if np.issubdtype(probabilities.dtype, np.floating):
        threshold = probabilities.dtype.type(threshold)
    return (probabilities > threshold).astype(np.uint8)


def remove_small_components(masks: np.ndarray, min_px: int) -> np.ndarray:
    """Drop 2-D connected components smaller than ``min_px`` pixels, slice by slice.

    Connectivity is 8 (diagonal neighbours join) and never crosses slices. A component of
    exactly ``min_px`` pixels is kept.

    Args:
        masks: {0,1} [N,H,W] or [H,W] (bool or numeric).
        min_px: minimum component size in pixels.

    Returns:
        ``masks`` itself (the same object, unchanged) when ``min_px <= 1``, since no component
        can be smaller; otherwise a new uint8 {0,1} array of the same shape.

    Raises:
        ValueError: masks not 2-D/3-D or not {0,1}.
    """
    array = np.asarray(masks)
    _check_ndim(array, (2, 3), "masks", "[N,H,W] or [H,W]")
    binary = as_mask(array, "masks")
    if min_px <= 1:
        return masks
    stack = binary[None] if binary.ndim == 2 else binary
    labels, count = ndimage.label(stack, structure=_PER_SLICE_8)
    if count == 0:
        return np.zeros(array.shape, np.uint8)
    keep = np.bincount(labels.ravel(), minlength=count + 1) >= min_px
    keep[0] = False
    out = keep.astype(np.uint8)[labels]
    return out[0] if array.ndim == 2 else out


def remove_faint_components(masks: np.ndarray, probabilities: np.ndarray, min_peak: float) -> np.ndarray:
    """Drop 2-D connected components (8-connectivity, slice by slice) whose highest probability is
    below ``min_peak``; a component whose peak equals it is kept.

    Args:
        masks: {0,1} [N,H,W] or [H,W]; probabilities: float, the same shape.
        min_peak: 0 disables the step.

    Returns:
        ``masks`` itself when ``min_peak <= 0``; otherwise a new uint8 {0,1} array.
    """
    array = np.asarray(masks)
    _check_ndim(array, (2, 3), "masks", "[N,H,W] or [H,W]")
    binary = as_mask(array, "masks")
    if min_peak <= 0:
        return masks
    probabilities = np.asarray(probabilities)
    if probabilities.shape != array.shape:
        raise ValueError(f"probabilities {probabilities.shape} and masks {array.shape} differ in shape")
    stack = binary[None] if binary.ndim == 2 else binary
    labels, count = ndimage.label(stack, structure=_PER_SLICE_8)
    if count == 0:
        return np.zeros(array.shape, np.uint8)
    peaks = ndimage.maximum(probabilities.reshape(stack.shape), labels, index=np.arange(1, count + 1))
    keep = np.concatenate([[False], np.asarray(peaks) >= min_peak])
    out = keep.astype(np.uint8)[labels]
    return out[0] if array.ndim == 2 else out


def keep_largest_component_3d(volume: np.ndarray, fraction: float = 1.0) -> np.ndarray:
    """Keep only the largest 26-connected component of a stacked [S,H,W] volume.

    Slices are taken as adjacent in the given order (order them by slice index first). Pixels
    touching across slices, diagonally included, belong to one component.

    Ties between equally large components go to the one containing the lowest flat (C-order)
    index, i.e. the component met first scanning slice by slice, row by row. With ``fraction``
    below 1, every component of at least ``fraction`` times the largest's voxels is kept too.

    Args:
        volume: {0,1} [S,H,W] (bool or numeric).
        fraction: in (0, 1]; 1.0 keeps the largest only.

    Returns:
        A new uint8 {0,1} array of the same shape; an empty volume (no tumour pixel, or S == 0)
        gives all zeros.

    Raises:
        ValueError: volume not 3-D or not {0,1}.
    """
    volume = np.asarray(volume)
    _check_ndim(volume, (3,), "volume", "[S,H,W]")
    binary = as_mask(volume, "volume")
    if binary.size == 0:
        return np.zeros(volume.shape, np.uint8)
    labels, count = ndimage.label(binary, structure=_FULL_26)
    if count <= 1:
        return binary.astype(np.uint8)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    if fraction < 1.0:
        keep = sizes >= fraction * sizes.max()
        keep[0] = False
        return keep.astype(np.uint8)[labels]
    winners = np.flatnonzero(sizes == sizes.max())
    if winners.size == 1:
        winner = int(winners[0])
    else:
        # Do not rely on scipy's label numbering: pick the tied label met first in C order.
        flat = labels.ravel()
        winner = int(flat[int(np.argmax(np.isin(flat, winners)))])
    return (labels == winner).astype(np.uint8)


def postprocess(probabilities: np.ndarray, options: PostprocessOptions | None = None,
                patient_ids: Sequence[Hashable] | None = None,
                slice_indices: Sequence[int] | None = None) -> np.ndarray:
    """Probabilities -> final uint8 {0,1} masks, in the input order.

    Steps: ``binarize`` at ``options.threshold``; ``remove_small_components`` with
    ``options.min_component_px``; ``remove_faint_components`` with ``options.min_component_peak``; then, if ``options.largest_component_3d``, the slices are
    grouped by patient id, each group is stacked in ascending slice_index order (the stack is
    contiguous: gaps between indices are not filled, so pass whole patients) and
    ``keep_largest_component_3d`` (with ``options.keep_3d_fraction``) runs on each patient independently. The 3-D step only sees
    the slices of this call: a patient split across calls is processed per part.

    Args:
        probabilities: float [N,H,W] (or one slice [H,W], returned as [H,W]).
        options: defaults to ``PostprocessOptions()``.
        patient_ids: one hashable id per slice; required for the 3-D step, ignored otherwise.
        slice_indices: one integer per slice; required for the 3-D step, ignored otherwise.

    Raises:
        ValueError: the 3-D step without patient_ids or slice_indices, their lengths not N, a
            (patient, slice_index) pair given twice, or a probabilities shape other than 2-D/3-D.
    """
    options = PostprocessOptions() if options is None else options
    probabilities = np.asarray(probabilities)
    _check_ndim(probabilities, (2, 3), "probabilities", "[N,H,W] or [H,W]")
    masks = binarize(probabilities, options.threshold)
    masks = remove_small_components(masks, options.min_component_px)
    masks = remove_faint_components(masks, probabilities, options.min_component_peak)
    if not options.largest_component_3d:
        return masks
    missing = [name for name, value in (("patient_ids", patient_ids), ("slice_indices", slice_indices))
               if value is None]
    if missing:
        raise ValueError(f"largest_component_3d needs {' and '.join(missing)} "
                         "(slices are grouped by patient and stacked by slice index)")
    single = masks.ndim == 2
    stack = masks[None] if single else masks
    ids, order = list(patient_ids), [int(i) for i in slice_indices]
    if len(ids) != len(stack) or len(order) != len(stack):
        raise ValueError(f"got {len(stack)} slices but {len(ids)} patient_ids and "
                         f"{len(order)} slice_indices")
    groups: dict[Hashable, list[int]] = {}
    for position, pid in enumerate(ids):
        groups.setdefault(pid, []).append(position)
    out = stack  # a fresh array from binarize/remove_small_components: safe to fill in place
    for pid, positions in groups.items():
        positions.sort(key=lambda p: order[p])
        sorted_indices = [order[p] for p in positions]
        if len(set(sorted_indices)) != len(sorted_indices):
            raise ValueError(f"patient {pid!r} has a slice_index given more than once: {sorted_indices}")
        out[positions] = keep_largest_component_3d(stack[positions], options.keep_3d_fraction)
    return out[0] if single else out


# ------------------------------------------------------------------------------------ findings


@dataclass
class Findings:
    """What one slice's mask and probabilities say.

    Attributes:
        tumor_present: the mask has at least one pixel.
        tumor_area_px: number of mask pixels.
        tumor_area_mm2: ``tumor_area_px * pixel_spacing_mm ** 2``.
        bbox: (x0, y0, x1, y1), x = column, y = row, x1/y1 EXCLUSIVE (``mask[y0:y1, x0:x1]``);
            None when there is no tumour.
        confidence: mean probability over the mask pixels when there is tumour; otherwise
            ``1 - max_probability`` (the confidence that there is none).
        max_probability: highest probability anywhere in the slice (not only inside the mask).
        mean_probability: mean probability over the mask pixels; 0.0 when there is none.
    """

    tumor_present: bool
    tumor_area_px: int
    tumor_area_mm2: float
    bbox: tuple[int, int, int, int] | None
    confidence: float
    max_probability: float
    mean_probability: float

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: Python bool/int/float, bbox as a 4-item list or None."""
        out = asdict(self)
        out["bbox"] = None if self.bbox is None else [int(v) for v in self.bbox]
        return out


def findings(masks: np.ndarray, probabilities: np.ndarray, pixel_spacing_mm: float = 1.0) -> list[Findings]:
    """One ``Findings`` per slice, computed for the whole batch at once.

    Args:
        masks: {0,1} [N,H,W] or [H,W] (a single slice gives a one-item list).
        probabilities: float, same shape as ``masks``; assumed finite in [0,1].
        pixel_spacing_mm: in-plane pixel size (both axes).

    Returns:
        A list of N ``Findings`` (empty for N == 0).

    Raises:
        ValueError: shapes differ, not 2-D/3-D, a slice with no pixels (H or W == 0), masks not
            {0,1}, or a spacing that is not positive.
    """
    probabilities = np.asarray(probabilities)
    masks = np.asarray(masks)
    if masks.shape != probabilities.shape:
        raise ValueError(f"masks {masks.shape} and probabilities {probabilities.shape} differ in shape")
    _check_ndim(masks, (2, 3), "masks", "[N,H,W] or [H,W]")
    _check_positive("pixel_spacing_mm", pixel_spacing_mm)
    binary = as_mask(masks, "masks")
    if binary.ndim == 2:
        binary, probabilities = binary[None], probabilities[None]
    n, h, w = binary.shape
    if n == 0:
        return []
    if h == 0 or w == 0:
        raise ValueError(f"slices must have pixels, got shape {masks.shape}")
    area = binary.sum(axis=(1, 2))
    max_p = probabilities.max(axis=(1, 2)).astype(np.float64)
    sum_p = np.where(binary, probabilities, 0).sum(axis=(1, 2), dtype=np.float64)
    mean_p = np.divide(sum_p, area, out=np.zeros(n, np.float64), where=area > 0)
    rows, cols = binary.any(axis=2), binary.any(axis=1)  # [N,H], [N,W]
    y0, y1 = rows.argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)
    x0, x1 = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
    pixel_mm2 = float(pixel_spacing_mm) ** 2
    out = []
    for i in range(n):
        present = bool(area[i] > 0)
        out.append(Findings(
            tumor_present=present,
            tumor_area_px=int(area[i]),
            tumor_area_mm2=float(area[i]) * pixel_mm2,
            bbox=(int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i])) if present else None,
            confidence=float(mean_p[i]) if present else 1.0 - float(max_p[i]),
            max_probability=float(max_p[i]),
            mean_probability=float(mean_p[i]),
        ))
    return out


def patient_volume_mm3(areas_px: Sequence[int], pixel_spacing_mm: float, slice_thickness_mm: float) -> float:
    """Tumour volume of one patient: ``sum(areas_px) * pixel_spacing_mm**2 * slice_thickness_mm``.

    Args:
        areas_px: tumour pixel count of each of the patient's slices (any order); empty -> 0.0.

    Raises:
        ValueError: a negative area, or a spacing/thickness that is not positive.
    """
    _check_positive("pixel_spacing_mm", pixel_spacing_mm)
    _check_positive("slice_thickness_mm", slice_thickness_mm)
    areas = [int(a) for a in areas_px]
    if any(a < 0 for a in areas):
        raise ValueError(f"areas_px must be non-negative, got {areas}")
    return float(sum(areas)) * float(pixel_spacing_mm) ** 2 * float(slice_thickness_mm)
