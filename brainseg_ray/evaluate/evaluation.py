"""The evaluation's data model: what evaluate/run.py measures for each model, as the report
(evaluate/report.py) and its figures (evaluate/figures.py) consume it, and how its values read in
their tables and plots.

numpy only (no matplotlib, no Ray), so the evaluate job imports it at the top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "COMPARISON",
    "DECIMALS",
    "Column",
    "ModelEvaluation",
    "WorstSlice",
    "cell_text",
    "finite_number",
    "lookup",
    "ordered_worst",
    "patient_rows",
    "patients_by_dice",
    "shortened",
    "table_text",
]


@dataclass
class WorstSlice:
    """One badly segmented slice, with the pixels needed to show it."""

    patient_id: str
    slice_index: int
    dice: float  # slice Dice (1.0 when truth and prediction are both empty)
    loss: float  # per-slice loss (higher is worse); the gallery is ordered by it, descending
    image: np.ndarray  # uint8 [H,W,3]; channel 1 (FLAIR) is shown as greyscale
    truth: np.ndarray  # uint8 [H,W] {0,1}
    prediction: np.ndarray  # uint8 [H,W] {0,1}
    probability: np.ndarray | None = None  # float32 [H,W] in [0,1], optional


@dataclass
class ModelEvaluation:
    """Everything measured for one model on one data set."""

    name: str  # label used in tables/file names, e.g. "unet-resnet34" or a path
    model_uri: str
    version: str  # artifact version
    threshold: float
    metrics: dict  # SegmentationMetrics.compute() output
    # One row per patient: patient_id, slices, tumour_slices, dice, tp, fp, fn, predicted_slices.
    patients: list[dict]
    worst: list[WorstSlice]
    seconds: float = 0.0  # inference time
    extra: dict = field(default_factory=dict)  # anything else to record (fingerprint, split, ...)
    # Rows of threshold, patient_dice_mean, slice_dice_mean, sensitivity, specificity: the same
    # predictions cut at other thresholds (empty: no sweep asked for).
    sweep: list[dict] = field(default_factory=list)
    postprocess: dict = field(default_factory=dict)  # the post-processing applied before scoring


# --- what models are compared on -------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One figure of the comparison table (report.md, report.json["comparison"], comparison.png)."""

    key: str  # key in report.json["comparison"] rows
    header: str
    path: tuple[str, ...] | None  # into the metrics dict; None: the evaluation's `seconds`
    higher_is_better: bool


COMPARISON: list[Column] = [
    Column("patient_dice_mean", "Patient Dice", ("patient_dice_mean",), True),
    Column("patient_dice_mean_tumour", "Patient Dice (tumour)", ("patient_dice_mean_tumour",), True),
    Column("slice_dice_mean", "Slice Dice", ("slice_dice_mean",), True),
    Column("sensitivity", "Sensitivity", ("detection", "sensitivity"), True),
    Column("specificity", "Specificity", ("detection", "specificity"), True),
    Column("far", "FAR", ("detection", "far"), False),
    Column("frr", "FRR", ("detection", "frr"), False),
    Column("seconds", "Seconds", None, False),
]

DECIMALS = 4


# --- values as the tables and figures show them -----------------------------------------------


def finite_number(value: Any) -> float | None:
    """A finite float, or None for None/NaN/inf/non-numbers (all shown as "n/a")."""
    if value is None or isinstance(value, (bool, np.bool_, str)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def lookup(metrics: Mapping | None, path: Sequence[str]) -> Any:
    """metrics[path[0]][path[1]]..., None where a level is missing (partial dicts still render)."""
    value: Any = metrics
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def table_text(value: Any) -> str:
    """Table text: integers as is, other numbers to 4 decimals, None/NaN as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = finite_number(value)
        return "n/a" if number is None else f"{number:.{DECIMALS}f}"
    return cell_text(str(value))


def cell_text(text: str) -> str:
    """Text safe inside a Markdown table cell (a '|' would start a new column)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def shortened(text: str, width: int = 40) -> str:
    """Long names (paths, URIs) shortened from the left for plot labels: the tail tells apart."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def ordered_worst(worst: Sequence[WorstSlice]) -> list[WorstSlice]:
    """Highest loss first; a slice without a usable loss goes last (stable otherwise)."""
    return sorted(worst, key=lambda w: (finite_number(w.loss) is None, -(finite_number(w.loss) or 0.0)))


def patients_by_dice(rows: Sequence[Mapping]) -> list[Mapping]:
    """Worst Dice first; rows without a Dice last; ties by patient id for a stable order."""
    return sorted(
        rows,
        key=lambda r: (finite_number(r.get("dice")) is None, finite_number(r.get("dice")) or 0.0,
                       str(r.get("patient_id", ""))),
    )


def patient_rows(evaluation: ModelEvaluation) -> list[dict]:
    """The evaluation's patient rows; without any, the bare per-patient Dice from the metrics."""
    if evaluation.patients:
        return list(evaluation.patients)
    per_patient = lookup(evaluation.metrics, ("patient_dice",)) or {}
    return [{"patient_id": pid, "dice": d} for pid, d in per_patient.items()]
