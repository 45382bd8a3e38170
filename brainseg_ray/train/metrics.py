"""Segmentation and detection metrics for binary FLAIR-lesion masks (numpy only).

Masks are bool arrays or numeric arrays holding only 0 and 1 (a [256,256] slice, a [N,256,256]
batch, or any shape as long as prediction and truth match). Anything else — probabilities,
logits, masks still in the 0/255 file convention — is rejected with ValueError, because silently
binarising it would hide a missing threshold step.

Pixel-level convention for zero denominators (one rule for every pixel ratio): a ratio whose
denominator is zero is 1.0 when prediction and truth agree on every pixel (fp == fn == 0), and
0.0 otherwise. Concretely:

    dice, iou      both masks empty -> 1.0; exactly one empty -> 0.0 (the usual formula)
    precision      nothing predicted -> 1.0 if the truth is empty too, else 0.0
    recall         empty truth       -> 1.0 if nothing was predicted, else 0.0
    specificity    no negative pixel -> 1.0 if no truth pixel was missed, else 0.0

Slice-level detection rates (a slice is "positive" when its mask has at least one pixel) are
reporting figures over a cohort, so an empty denominator means "no slices to measure on": those
rates are float('nan'), and `SegmentationMetrics.compute` turns every NaN into None so the result
is strict JSON.

The primary figure is the per-patient 3-D Dice: all slices of a patient are pooled into one
volume before the ratio, so large-lesion slices weigh by their size and tumour-free slices with no
false positives cost nothing. It differs from the mean of per-slice Dice scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from brainseg_ray.masks import as_mask

__all__ = [
    "DetectionCounts",
    "PixelCounts",
    "SegmentationMetrics",
    "detection_counts",
    "dice",
    "iou",
    "patient_dice",
    "pixel_counts",
    "summarize",
]


# --- helpers ----------------------------------------------------------------------------------


def _pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = as_mask(pred, "pred"), as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} does not match truth shape {t.shape}")
    return p, t


def _agreement_ratio(num: int, den: int, agree: bool) -> float:
    """num/den, or the pixel convention when den == 0: 1.0 if the masks agree, else 0.0."""
    if den == 0:
        return 1.0 if agree else 0.0
    return num / den


def _rate(num: int, den: int) -> float:
    """num/den, NaN when den == 0 (a detection rate with nothing to measure)."""
    return num / den if den else math.nan


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# --- pixel level ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelCounts:
    """Pixel confusion counts of one or more masks. Add two to pool them (micro averaging).

    Every ratio follows the module's zero-denominator rule: 1.0 when prediction and truth agree
    on every pixel counted (fp == fn == 0), else 0.0.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: PixelCounts) -> PixelCounts:
        if not isinstance(other, PixelCounts):
            return NotImplemented
        return PixelCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def _agree(self) -> bool:
        return self.fp == 0 and self.fn == 0

    @property
    def precision(self) -> float:
        """tp/(tp+fp). Nothing predicted: 1.0 if the truth is empty too (tp+fn == 0), else 0.0."""
        return _agreement_ratio(self.tp, self.tp + self.fp, self._agree)

    @property
    def recall(self) -> float:
        """tp/(tp+fn). Empty truth: 1.0 if nothing was predicted (fp == 0), else 0.0."""
        return _agreement_ratio(self.tp, self.tp + self.fn, self._agree)

    @property
    def specificity(self) -> float:
        """tn/(tn+fp). No negative pixel at all: 1.0 if fn == 0, else 0.0."""
        return _agreement_ratio(self.tn, self.tn + self.fp, self._agree)

    @property
    def dice(self) -> float:
        """2tp/(2tp+fp+fn). Both masks empty: 1.0 (perfect agreement on nothing)."""
        return _agreement_ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, self._agree)

    @property
    def iou(self) -> float:
        """tp/(tp+fp+fn). Both masks empty: 1.0."""
        return _agreement_ratio(self.tp, self.tp + self.fp + self.fn, self._agree)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
            "precision": self.precision, "recall": self.recall,
            "specificity": self.specificity, "dice": self.dice, "iou": self.iou,
        }


def pixel_counts(pred: Any, truth: Any) -> PixelCounts:
    """Confusion counts of two same-shaped binary masks (any number of dimensions)."""
    p, t = _pair(pred, truth)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return PixelCounts(tp=tp, fp=fp, fn=fn, tn=int(p.size) - tp - fp - fn)


def slice_counts(preds: Any, truths: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice (tp, fp, fn, tn) pixel counts of [N,H,W] binary masks, each an int array of N,
    vectorised: what `SegmentationMetrics.update_counts` takes."""
    p, t = _pair(preds, truths)
    if p.ndim != 3:
        raise ValueError(f"expected masks of shape [N,H,W], got {p.shape}")
    tp = np.count_nonzero(p & t, axis=(1, 2))
    n_pred, n_truth = np.count_nonzero(p, axis=(1, 2)), np.count_nonzero(t, axis=(1, 2))
    return tp, n_pred - tp, n_truth - tp, p.shape[1] * p.shape[2] - n_pred - n_truth + tp


def dice(pred: Any, truth: Any) -> float:
    """2|P∩T|/(|P|+|T|). Both empty -> 1.0 (perfect agreement on nothing); one empty -> 0.0."""
    return pixel_counts(pred, truth).dice


def iou(pred: Any, truth: Any) -> float:
    """|P∩T|/|P∪T|. Both empty -> 1.0; exactly one empty -> 0.0."""
    return pixel_counts(pred, truth).iou


def patient_dice(preds: Sequence[Any], truths: Sequence[Any]) -> float:
    """3-D Dice of one patient: its slices pooled into one volume, not a mean of slice scores.

    The slices may come in any order (pooling is order-free). A patient with no tumour in truth
    and none predicted scores 1.0; with no tumour but any predicted pixel, 0.0. An empty
    sequence of slices raises ValueError (there is no volume to score).
    """
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predicted slices but {len(truths)} truth slices")
    if not preds:
        raise ValueError("patient_dice needs at least one slice")
    total = PixelCounts()
    for p, t in zip(preds, truths):
        total = total + pixel_counts(p, t)
    return total.dice


# --- slice-level detection --------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionCounts:
    """Slice-level tumour detection counts; a slice is positive when its mask has >= 1 pixel.

    Rates with a zero denominator are float('nan'): e.g. `sensitivity` and `frr` of a set
    without any tumour slice, `specificity` and `far` of a set without any tumour-free slice.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        if not isinstance(other, DetectionCounts):
            return NotImplemented
        return DetectionCounts(
            *(getattr(self, f.name) + getattr(other, f.name) for f in fields(self))
        )

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def sensitivity(self) -> float:
        """tp/(tp+fn): tumour slices flagged. NaN without tumour slices."""
        return _rate(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """tn/(tn+fp): tumour-free slices left empty. NaN without tumour-free slices."""
        return _rate(self.tn, self.tn + self.fp)

    @property
    def far(self) -> float:
        """False alarm rate fp/(fp+tn) = 1 - specificity. NaN without tumour-free slices."""
        return _rate(self.fp, self.fp + self.tn)

    @property
    def frr(self) -> float:
        """False rejection rate fn/(fn+tp) = 1 - sensitivity. NaN without tumour slices."""
        return _rate(self.fn, self.fn + self.tp)

    @property
    def accuracy(self) -> float:
        """(tp+tn)/all slices. NaN with no slices."""
        return _rate(self.tp + self.tn, self.total)

    def as_dict(self) -> dict[str, float | int | None]:
        """Counts and rates, NaN rates as None (strict JSON)."""
        return {
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
            "sensitivity": _json_float(self.sensitivity),
            "specificity": _json_float(self.specificity),
            "far": _json_float(self.far),
            "frr": _json_float(self.frr),
            "accuracy": _json_float(self.accuracy),
        }


def detection_counts(
    pred_positive: Sequence[bool], truth_positive: Sequence[bool]
) -> DetectionCounts:
    """Slice-level confusion counts from per-slice 'has tumour' flags (same length)."""
    p = np.asarray(pred_positive, dtype=bool).ravel()
    t = np.asarray(truth_positive, dtype=bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predicted flags but {t.size} truth flags")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return DetectionCounts(tp=tp, fp=fp, fn=fn, tn=int(p.size) - tp - fp - fn)


# --- streaming accumulator --------------------------------------------------------------------


class SegmentationMetrics:
    """Accumulates the evaluation figures batch by batch; keeps counts, never masks.

    Memory is O(patients): per patient one PixelCounts, plus running sums. Batches of one
    patient may be spread over many `update` calls in any order. Two accumulators (e.g. from
    different Ray workers) combine with `merge`.
    """

    def __init__(self) -> None:
        self.patients: dict[str, PixelCounts] = {}
        self.detection = DetectionCounts()
        self.num_slices = 0
        # Per-slice Dice/IoU are averaged over slices with tumour in truth only: on tumour-free
        # slices they are 0/1 by convention and would swamp the mean (most LGG slices are empty).
        self.tumour_slices = 0
        self.slice_dice_sum = 0.0
        self.slice_iou_sum = 0.0

    def update(self, patient_ids: Sequence[str], preds: Any, truths: Any) -> None:
        """Add a batch: `patient_ids` of length N, binary `preds`/`truths` of shape [N,H,W]
        (or [N,1,H,W]; the channel axis is dropped). N == 0 is a no-op."""
        p, t = _pair(preds, truths)
        if p.ndim == 4 and p.shape[1] == 1:
            p, t = p[:, 0], t[:, 0]
        if p.ndim != 3:
            raise ValueError(f"expected masks of shape [N,H,W] or [N,1,H,W], got {p.shape}")
        ids = list(patient_ids)
        if len(ids) != p.shape[0]:
            raise ValueError(f"{len(ids)} patient ids for a batch of {p.shape[0]} slices")
        if not ids:
            return

        self.update_counts(ids, *slice_counts(p, t))

    def update_counts(self, patient_ids: Sequence[str], tp: Any, fp: Any, fn: Any, tn: Any) -> None:
        """Add slices given by their pixel counts (one entry per slice), e.g. counted on a Ray
        worker so that masks never travel; the same result as `update` on the masks."""
        tp, fp, fn, tn = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (tp, fp, fn, tn))
        ids = list(patient_ids)
        if not (len(ids) == len(tp) == len(fp) == len(fn) == len(tn)):
            raise ValueError("patient_ids and the tp/fp/fn/tn counts must have one entry per slice")
        if (np.concatenate([tp, fp, fn, tn]) < 0).any():
            raise ValueError("pixel counts must not be negative")
        for pid, a, b, c, d in zip(ids, tp.tolist(), fp.tolist(), fn.tolist(), tn.tolist()):
            counts = PixelCounts(tp=a, fp=b, fn=c, tn=d)
            self.patients[pid] = self.patients.get(pid, PixelCounts()) + counts
            if a + c > 0:
                self.tumour_slices += 1
                self.slice_dice_sum += counts.dice
                self.slice_iou_sum += counts.iou
        self.detection = self.detection + detection_counts(tp + fp > 0, tp + fn > 0)
        self.num_slices += len(ids)

    def merge(self, other: SegmentationMetrics) -> SegmentationMetrics:
        """Fold `other` into this accumulator (in place) and return self."""
        for pid, counts in other.patients.items():
            self.patients[pid] = self.patients.get(pid, PixelCounts()) + counts
        self.detection = self.detection + other.detection
        self.num_slices += other.num_slices
        self.tumour_slices += other.tumour_slices
        self.slice_dice_sum += other.slice_dice_sum
        self.slice_iou_sum += other.slice_iou_sum
        return self

    def compute(self) -> dict[str, Any]:
        """JSON-ready summary; any figure with nothing to average over is None.

        Keys: patient_dice_mean (primary: mean of per-patient 3-D Dice), patient_dice_mean_tumour
        (same over patients with tumour in truth, which avoids the 0/1 convention of tumour-free
        patients), patient_dice {id: dice}, num_patients, num_slices, num_tumour_slices,
        slice_dice_mean / slice_iou_mean (over tumour slices only), pixel {tp, fp, fn, tn,
        precision, recall, specificity, dice, iou} micro-averaged over all pixels, detection
        {tp, fp, fn, tn, sensitivity, specificity, far, frr, accuracy}.
        """
        per_patient = {pid: self.patients[pid].dice for pid in sorted(self.patients)}
        with_tumour = [
            per_patient[pid] for pid in per_patient if self.patients[pid].tp + self.patients[pid].fn
        ]
        pooled = sum(self.patients.values(), PixelCounts())
        tumour_slices = self.tumour_slices
        return {
            "patient_dice_mean": _mean(per_patient.values()),
            "patient_dice_mean_tumour": _mean(with_tumour),
            "patient_dice": per_patient,
            "num_patients": len(per_patient),
            "num_slices": self.num_slices,
            "num_tumour_slices": self.tumour_slices,
            "slice_dice_mean": self.slice_dice_sum / tumour_slices if tumour_slices else None,
            "slice_iou_mean": self.slice_iou_sum / tumour_slices if tumour_slices else None,
            "pixel": pooled.as_dict(),
            "detection": self.detection.as_dict(),
        }


def _mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def summarize(per_slice_rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """`SegmentationMetrics.compute()` over rows {patient_id, pred, truth} (one slice each).

    Rows are consumed one at a time, so a generator over a large prediction set stays light.
    """
    metrics = SegmentationMetrics()
    for row in per_slice_rows:
        pred, truth = np.asarray(row["pred"]), np.asarray(row["truth"])
        metrics.update([row["patient_id"]], pred[None], truth[None])
    return metrics.compute()
