"""Score a finished bulk segmentation (`brainseg segment`'s output) against reference masks.

The figures come from the mask files the job wrote, the very files a user receives, not from
a second run of the model: each slice's DST/masks/... TIFF is compared with the reference mask of
the same (patient, slice) found under TRUTH (any source `brainseg ingest` reads). The metrics are
train/metrics.py's, as in `brainseg evaluate`: mean per-patient 3-D Dice, slice detection
sensitivity and specificity, pixel precision and recall.

Counts add up: every ok row of results.parquet is scored or counted as unmatched (no reference
mask for it), and every reference slice without an ok row is counted as missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from brainseg_ray import storage
from brainseg_ray.batch import MANIFEST_FILE, RESULTS_FILE, mask_relpath
from brainseg_ray.data.catalog import build_catalog
from brainseg_ray.data.decode import SliceError, read_pixels, to_mask
from brainseg_ray.train.metrics import SegmentationMetrics


class ScoreError(Exception):
    """An output or reference that cannot be scored; the message names it and says why."""


@dataclass
class MaskScore:
    output: str
    truth: str
    metrics: dict  # SegmentationMetrics.compute()
    scored: int
    unmatched: list[str]  # ok rows without a reference mask
    missing: list[str]  # reference slices without an ok row

    def summary_line(self) -> str:
        m, d = self.metrics, self.metrics["detection"]
        return (f"score: {self.scored} slices of {m['num_patients']} patients: mean patient Dice "
                f"{_fmt(m['patient_dice_mean'])}, detection sensitivity {_fmt(d['sensitivity'])}, "
                f"specificity {_fmt(d['specificity'])} ({len(self.unmatched)} without a reference, "
                f"{len(self.missing)} references without a mask)")

    def as_dict(self) -> dict:
        return {"output": self.output, "truth": self.truth, "scored": self.scored, "unmatched": self.unmatched,
                "missing": self.missing, "metrics": self.metrics}


def _read_mask(uri: str, s3: storage.S3Options | None) -> np.ndarray:
    pixels = read_pixels(storage.read_bytes(uri, s3))
    return to_mask(pixels, pixels.shape[:2], size=pixels.shape[0]).astype(bool)


def score_masks(output: str, truth: str, s3: storage.S3Options | None = None) -> MaskScore:
    """Compare the masks of the bulk segmentation under `output` with the reference masks under `truth`."""
    if not storage.exists(storage.join(output, MANIFEST_FILE), s3):
        raise ScoreError(f"{output}: not a finished bulk segmentation (no {MANIFEST_FILE})")
    fs, path = storage.arrow_filesystem(storage.join(output, RESULTS_FILE), s3)
    results = pq.read_table(path, filesystem=fs, columns=["patient_id", "slice_index", "status"]).to_pylist()
    references = {(r.patient_id, r.slice_index): r.mask_uri for r in build_catalog(truth, s3).good() if r.mask_uri}
    if not references:
        raise ScoreError(f"{truth}: no reference masks found")
    metrics, scored, unmatched, seen = SegmentationMetrics(), 0, [], set()
    for row in sorted((r for r in results if r["status"] == "ok"), key=lambda r: (r["patient_id"], r["slice_index"])):
        key = (row["patient_id"], row["slice_index"])
        if key not in references:
            unmatched.append(f"{key[0]}_{key[1]}")
            continue
        # The mask under this output (not the row's mask_uri), so a moved or copied output scores too.
        mask_uri = storage.join(output, mask_relpath(*key))
        try:
            predicted, reference = _read_mask(mask_uri, s3), _read_mask(references[key], s3)
        except (SliceError, storage.StorageError, OSError) as exc:
            raise ScoreError(f"{mask_uri} or {references[key]}: {exc}") from None
        metrics.update([key[0]], predicted[None], reference[None])
        scored += 1
        seen.add(key)
    missing = sorted(f"{p}_{i}" for p, i in set(references) - seen)
    return MaskScore(output=output, truth=truth, metrics=metrics.compute(), scored=scored, unmatched=unmatched,
                     missing=missing)


def write_score(score: MaskScore, uri: str, s3: storage.S3Options | None = None) -> None:
    storage.write_bytes(uri, (json.dumps(score.as_dict(), indent=1) + "\n").encode(), s3)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
