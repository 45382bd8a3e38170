"""Seeded synthetic LGG-like brain MRI volumes in the ``kaggle_3m`` layout.

This is the project's embedded default data: the demo and most tests run on it, and a small
U-Net must be able to learn it. Every slice is a 3-channel 8-bit image (pre-contrast T1, FLAIR,
post-contrast T1) of an elliptical head with scalp, skull, cortex with sulci, white matter and
ventricles; most patients carry one irregular 3-D lesion that is clearly bright in FLAIR and
only faintly visible in the T1 channels. The mask is exactly the lesion region (0 / 255).

Layout written by :func:`write_synthetic_dataset` (same as the public LGG data set)::

    OUT/kaggle_3m/data.csv                      one row per patient ("Patient" = id minus date)
    OUT/kaggle_3m/<PID>/<PID>_<i>.tif           256x256x3 uint8, i = 1..N
    OUT/kaggle_3m/<PID>/<PID>_<i>_mask.tif      256x256 uint8 in {0, 255}

Determinism: patient ``k`` is drawn from ``SeedSequence(seed, spawn_key=(k, stream))`` only, so
it is identical whatever the total patient count, and equal arguments give byte-identical files.
A patient's slices and mask are drawn by synthetic_volume.py; this module names, lays out and
writes them.
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from brainseg_ray.data.synthetic_volume import synthesize_patient

__all__ = ["SyntheticSummary", "write_synthetic_dataset", "patient_id"]

# Header of the public data set's data.csv, so readers of the real file read ours unchanged.
CSV_HEADER = (
    "Patient", "RNASeqCluster", "MethylationCluster", "miRNACluster", "CNCluster",
    "RPPACluster", "OncosignCluster", "COCCluster", "histological_type",
    "neoplasm_histologic_grade", "tumor_tissue_site", "laterality", "tumor_location", "gender",
    "age_at_initial_pathologic", "race", "ethnicity", "death01",
)
# Plausible value ranges (inclusive) per clinical column; _OFTEN_BLANK columns are frequently
# empty in the real file, the others only rarely.
_CSV_RANGES: dict[str, tuple[int, int]] = {
    "RNASeqCluster": (1, 4), "MethylationCluster": (1, 5), "miRNACluster": (1, 3),
    "CNCluster": (1, 3), "RPPACluster": (1, 3), "OncosignCluster": (1, 3), "COCCluster": (1, 3),
    "histological_type": (1, 3), "neoplasm_histologic_grade": (1, 2), "tumor_tissue_site": (1, 1),
    "laterality": (1, 3), "tumor_location": (1, 6), "gender": (1, 2),
    "age_at_initial_pathologic": (20, 75), "race": (1, 3), "ethnicity": (1, 2), "death01": (0, 1),
}
_OFTEN_BLANK = ("RPPACluster", "ethnicity")

INSTITUTIONS = ("AA", "BB", "CC", "DD")
_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_GOLDEN = 0.6180339887498949  # low-discrepancy step: lesion patients spread evenly over k

# Independent random streams per patient, so e.g. a new data.csv column never changes pixels.
_STREAM_IMAGE, _STREAM_ID, _STREAM_CSV, _STREAM_SLICES = 0, 1, 2, 3

@dataclass(frozen=True)
class SyntheticSummary:
    root: str  # OUT/kaggle_3m
    patients: int
    slices: int
    tumour_slices: int


# ----------------------------------------------------------------------------- dataset


def _patient_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, stream)))


def _base36(value: int, width: int = 4) -> str:
    digits = ""
    while value or len(digits) < width:
        value, r = divmod(value, 36)
        digits = _B36[r] + digits
    return digits


def patient_id(seed: int, index: int) -> str:
    """``SYN_<INST>_<code>_<YYYYMMDD>``; the code is the index in base 36, so ids are unique."""
    rng = _patient_rng(seed, index, _STREAM_ID)
    inst = INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))]
    year, month, day = rng.integers(1985, 2006), rng.integers(1, 13), rng.integers(1, 29)
    return f"SYN_{inst}_{_base36(index)}_{year:04d}{month:02d}{day:02d}"


def _has_lesion(seed: int, index: int, lesion_fraction: float) -> bool:
    """Golden-ratio sequence: any run of patients holds ~lesion_fraction lesions, and patient k's
    draw does not depend on how many patients there are."""
    offset = np.random.SeedSequence(seed).generate_state(1)[0] / 2.0**32
    return (offset + index * _GOLDEN) % 1.0 < lesion_fraction


def _csv_row(seed: int, index: int, pid: str) -> list[str]:
    rng = _patient_rng(seed, index, _STREAM_CSV)
    row = [pid.rsplit("_", 1)[0]]
    for col in CSV_HEADER[1:]:
        lo, hi = _CSV_RANGES[col]
        blank = rng.random() < (0.3 if col in _OFTEN_BLANK else 0.03)
        value = int(rng.integers(lo, hi + 1))
        row.append("" if blank else str(value))
    return row


def _prepare_root(root: Path) -> None:
    """Start from an empty root; replace only a previous synthetic data set, never real data."""
    if root.exists():
        entries = list(root.iterdir())
        ours = all(e.name == "data.csv" or (e.is_dir() and e.name.startswith("SYN_"))
                   for e in entries)
        if not ours:
            raise FileExistsError(f"{root} exists and does not look like synthetic data")
        shutil.rmtree(root)
    root.mkdir(parents=True)


def _write_tif(path: Path, array: np.ndarray, photometric: str, compression: str | None) -> None:
    # No datetime/metadata arguments: tifffile then writes nothing time- or host-dependent.
    # Deflate level 1: the noisy slices barely compress better at higher levels, 4x slower.
    args = {"level": 1} if compression in ("zlib", "deflate", "adobe_deflate") else None
    tifffile.imwrite(path, array, photometric=photometric, compression=compression,
                     compressionargs=args)


def write_synthetic_dataset(out_dir: str, patients: int = 10, seed: int = 0,
                            slices_per_patient: tuple[int, int] = (20, 30),
                            lesion_fraction: float = 0.8, compression: str | None = "zlib",
                            size: int = 256) -> SyntheticSummary:
    """Writes OUT/kaggle_3m as above; deterministic: same arguments -> byte-identical files.

    ``slices_per_patient`` is an inclusive (min, max) range. An existing ``OUT/kaggle_3m`` is
    replaced only if it holds nothing but a previous synthetic data set.
    """
    lo, hi = slices_per_patient
    if patients < 0 or not 1 <= lo <= hi or not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError("need patients >= 0, 1 <= min slices <= max, 0 <= lesion_fraction <= 1")
    root = Path(out_dir) / "kaggle_3m"
    _prepare_root(root)
    rows, total, tumour = [], 0, 0
    for k in range(patients):
        pid = patient_id(seed, k)
        n = int(_patient_rng(seed, k, _STREAM_SLICES).integers(lo, hi + 1))
        images, masks = synthesize_patient(_patient_rng(seed, k, _STREAM_IMAGE), n,
                                           _has_lesion(seed, k, lesion_fraction), size)
        folder = root / pid
        folder.mkdir()
        for i in range(n):
            _write_tif(folder / f"{pid}_{i + 1}.tif", images[i], "rgb", compression)
            _write_tif(folder / f"{pid}_{i + 1}_mask.tif", masks[i], "minisblack", compression)
        rows.append(_csv_row(seed, k, pid))
        total += n
        tumour += int(masks.any(axis=(1, 2)).sum())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(rows)
    (root / "data.csv").write_text(buf.getvalue(), encoding="utf-8")
    return SyntheticSummary(root=str(root), patients=patients, slices=total, tumour_slices=tumour)
