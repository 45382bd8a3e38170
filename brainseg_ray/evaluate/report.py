"""Render an evaluation of one or more segmentation models as files: JSON, Markdown and PNGs.

The evaluation itself (running the models, measuring) happens elsewhere and arrives here as
`ModelEvaluation` objects; this module only turns them into a report under a local folder or an
s3:// prefix::

    report.json                 everything, strict JSON (NaN -> null), the machine-readable record
    report.md                   the same for people, with the figures linked relatively
    confusion_<slug>.png        per model: slice-detection confusion matrix
    worst_<slug>.png            per model: gallery of the worst slices (highest loss first)
    patients_<slug>.png         per model: per-patient Dice, sorted
    comparison.png              only with several models: the main figures side by side

report.md is rendered from the JSON dict, not from the evaluations, so the two never disagree
and a stored report.json can be re-rendered with `render_markdown`.

Plots are drawn on brainseg_ray.plotting's bare Agg figures: no display is needed and nothing
leaks when many reports are written in one process. PNG bytes go through `storage.write_bytes`,
so an s3:// destination works like a local one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import numpy as np

from brainseg_ray import storage
from brainseg_ray.plotting import new_figure, png_bytes

__all__ = [
    "ModelEvaluation",
    "WorstSlice",
    "plot_comparison",
    "plot_confusion",
    "plot_patients",
    "plot_worst",
    "render_markdown",
    "slugify",
    "unique_slugs",
    "write_report",
]

REPORT_KIND = "brainseg-ray evaluation"


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


# --- what the tables show ---------------------------------------------------------------------

# (label, path into the metrics dict) of the per-model headline table.
_HEADLINE: list[tuple[str, tuple[str, ...]]] = [
    ("Patient Dice (mean)", ("patient_dice_mean",)),
    ("Patient Dice (mean over tumour patients)", ("patient_dice_mean_tumour",)),
    ("Slice Dice (mean over tumour slices)", ("slice_dice_mean",)),
    ("Slice IoU (mean over tumour slices)", ("slice_iou_mean",)),
    ("Pixel precision", ("pixel", "precision")),
    ("Pixel recall", ("pixel", "recall")),
    ("Pixel specificity", ("pixel", "specificity")),
    ("Detection sensitivity", ("detection", "sensitivity")),
    ("Detection specificity", ("detection", "specificity")),
    ("Detection FAR (false alarm rate)", ("detection", "far")),
    ("Detection FRR (false rejection rate)", ("detection", "frr")),
]


@dataclass(frozen=True)
class _Column:
    key: str  # key in report.json["comparison"] rows
    header: str
    path: tuple[str, ...] | None  # into the metrics dict; None: the evaluation's `seconds`
    higher_is_better: bool


_COMPARISON: list[_Column] = [
    _Column("patient_dice_mean", "Patient Dice", ("patient_dice_mean",), True),
    _Column("patient_dice_mean_tumour", "Patient Dice (tumour)", ("patient_dice_mean_tumour",), True),
    _Column("slice_dice_mean", "Slice Dice", ("slice_dice_mean",), True),
    _Column("sensitivity", "Sensitivity", ("detection", "sensitivity"), True),
    _Column("specificity", "Specificity", ("detection", "specificity"), True),
    _Column("far", "FAR", ("detection", "far"), False),
    _Column("frr", "FRR", ("detection", "frr"), False),
    _Column("seconds", "Seconds", None, False),
]

_DECIMALS = 4


# --- small helpers ----------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """`obj` as plain JSON data: numpy scalars/arrays to Python, NaN and ±inf to None.

    Unknown objects become their str() so that anything put into `extra` is recorded rather
    than failing the whole report at the last step.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    return str(obj)


def _number(value: Any) -> float | None:
    """A finite float, or None for None/NaN/inf/non-numbers (all shown as "n/a")."""
    if value is None or isinstance(value, (bool, np.bool_, str)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _get(metrics: Mapping | None, path: Sequence[str]) -> Any:
    """metrics[path[0]][path[1]]..., None where a level is missing (partial dicts still render)."""
    value: Any = metrics
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _fmt(value: Any) -> str:
    """Table text: integers as is, other numbers to 4 decimals, None/NaN as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = _number(value)
        return "n/a" if number is None else f"{number:.{_DECIMALS}f}"
    return _cell(str(value))


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a '|' would start a new column)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _short(text: str, width: int = 40) -> str:
    """Long names (paths, URIs) shortened from the left for plot labels: the tail tells apart."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def slugify(name: str, max_length: int = 64) -> str:
    """A file-name-safe form of `name`: lowercase, only [a-z0-9._-], never empty.

    Accents are dropped (é -> e), every other run of characters becomes '-'. Long names keep
    their tail, which is what tells model paths apart ('.../unet/v3' vs '.../unet/v4').
    """
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    slug = re.sub(r"-{2,}", "-", slug).strip("-._")  # no hidden files, no '..'
    slug = slug[-max_length:].strip("-._")
    return slug or "model"


def unique_slugs(names: Sequence[str]) -> list[str]:
    """`slugify` of each name, made unique in order by appending -2, -3, ... to repeats."""
    seen: set[str] = set()
    slugs = []
    for name in names:
        base = slug = slugify(name)
        n = 2
        while slug in seen:
            slug = f"{base}-{n}"
            n += 1
        seen.add(slug)
        slugs.append(slug)
    return slugs


def _ordered_worst(worst: Sequence[WorstSlice]) -> list[WorstSlice]:
    """Highest loss first; a slice without a usable loss goes last (stable otherwise)."""
    return sorted(worst, key=lambda w: (_number(w.loss) is None, -(_number(w.loss) or 0.0)))


def _patients_by_dice(rows: Sequence[Mapping]) -> list[Mapping]:
    """Worst Dice first; rows without a Dice last; ties by patient id for a stable order."""
    return sorted(
        rows,
        key=lambda r: (_number(r.get("dice")) is None, _number(r.get("dice")) or 0.0,
                       str(r.get("patient_id", ""))),
    )


def _patient_rows(evaluation: ModelEvaluation) -> list[dict]:
    """The evaluation's patient rows; without any, the bare per-patient Dice from the metrics."""
    if evaluation.patients:
        return list(evaluation.patients)
    per_patient = _get(evaluation.metrics, ("patient_dice",)) or {}
    return [{"patient_id": pid, "dice": d} for pid, d in per_patient.items()]


# --- figures ----------------------------------------------------------------------------------


def _note(ax, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center",
            color="#888888", fontsize=13)


def plot_confusion(detection: Mapping | None, title: str = "") -> bytes:
    """PNG of the slice-level 2x2 detection matrix, shaded by the share of each truth row.

    Rows are truth (tumour / no tumour), columns the prediction; each cell shows its count and
    its row rate (sensitivity, FRR / FAR, specificity). A truth row without slices has no rate
    and is drawn grey.
    """
    from matplotlib import colormaps

    d = detection or {}
    counts = np.array([[d.get("tp") or 0, d.get("fn") or 0],
                       [d.get("fp") or 0, d.get("tn") or 0]], dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)
    names = [["sensitivity", "FRR"], ["FAR", "specificity"]]

    fig = new_figure((5.6, 4.6), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["Blues"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(rates), cmap=cmap, vmin=0.0, vmax=1.0)
    for i in range(2):
        for j in range(2):
            rate = rates[i, j]
            rate_text = "n/a" if np.isnan(rate) else f"{rate:.{_DECIMALS}f}"
            ax.text(j, i, f"{counts[i, j]}\n{names[i][j]} {rate_text}", ha="center", va="center",
                    fontsize=11, color="white" if rate > 0.6 else "black")
    ax.set_xticks([0, 1], ["predicted tumour", "predicted no tumour"])
    ax.set_yticks([0, 1], ["truth tumour", "truth no tumour"])
    ax.set_title(f"Slice detection: {_short(title)}" if title else "Slice detection", fontsize=11)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the truth row")
    return png_bytes(fig)


def _flair(image: np.ndarray) -> np.ndarray:
    """The FLAIR channel of an [H,W,3] slice (an [H,W] image is taken as FLAIR already)."""
    image = np.asarray(image)
    if image.ndim == 3:
        return image[..., 1] if image.shape[-1] > 1 else image[..., 0]
    if image.ndim == 2:
        return image
    raise ValueError(f"slice image must be [H,W,3] or [H,W], got shape {image.shape}")


def _tint(ax, mask: np.ndarray, colour: tuple[float, float, float], alpha: float = 0.45) -> None:
    overlay = np.zeros((*mask.shape, 4), dtype=np.float32)
    overlay[mask] = (*colour, alpha)
    ax.imshow(overlay, interpolation="nearest")


def _outline(ax, mask: np.ndarray, colour: str) -> None:
    # contour() warns when the level lies outside the data, i.e. on an empty or full mask.
    if 0 < np.count_nonzero(mask) < mask.size:
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.0)


_TRUTH_RGB = (0.17, 0.63, 0.17)  # green
_PRED_RGB = (0.84, 0.15, 0.16)  # red


def plot_worst(worst: Sequence[WorstSlice], title: str = "") -> bytes:
    """PNG gallery, one row per slice in the order given: FLAIR, truth, prediction[, probability].

    Truth is tinted green, the prediction red with the truth outlined on top (misses and false
    alarms show at a glance). The probability column appears when any slice carries one. An
    empty list gives a small figure saying "no slices".
    """
    worst = list(worst)
    if not worst:
        fig = new_figure((4.0, 1.6), layout="constrained")
        _note(fig.subplots(), "no slices")
        if title:
            fig.suptitle(_short(title), fontsize=10)
        return png_bytes(fig)

    show_probability = any(w.probability is not None for w in worst)
    columns = 4 if show_probability else 3
    row_height = 2.9
    height = row_height * len(worst) + (0.4 if title else 0.0)
    fig = new_figure((2.6 * columns, height), layout="constrained")
    if title:
        fig.suptitle(f"Worst slices: {_short(title)}", fontsize=12)
    rows = fig.subfigures(len(worst), 1, squeeze=False)[:, 0]
    for rank, (sub, w) in enumerate(zip(rows, worst), start=1):
        flair = _flair(w.image)
        truth = np.asarray(w.truth) > 0
        pred = np.asarray(w.prediction) > 0
        if truth.shape != flair.shape or pred.shape != flair.shape:
            raise ValueError(
                f"{w.patient_id} slice {w.slice_index}: image {flair.shape}, truth {truth.shape} "
                f"and prediction {pred.shape} must have the same height and width"
            )
        sub.suptitle(f"#{rank} {w.patient_id} · slice {w.slice_index} · Dice {_fmt(_number(w.dice))}"
                     f" · loss {_fmt(_number(w.loss))}", fontsize=9)
        axes = sub.subplots(1, columns)
        for ax in axes:
            # No ticks at all: hidden axes still compute them, the bulk of the drawing time.
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_axis_off()
        for ax in axes[:3]:  # the image under the FLAIR, truth and prediction panels
            ax.imshow(flair, cmap="gray", vmin=0, vmax=255 if flair.dtype == np.uint8 else None,
                      interpolation="nearest")
        axes[0].set_title("FLAIR", fontsize=8)
        _tint(axes[1], truth, _TRUTH_RGB)
        _outline(axes[1], truth, "#2ca02c")
        axes[1].set_title(f"truth ({np.count_nonzero(truth)} px)", fontsize=8)
        _tint(axes[2], pred, _PRED_RGB)
        _outline(axes[2], truth, "#2ca02c")
        axes[2].set_title(f"prediction ({np.count_nonzero(pred)} px)", fontsize=8)
        if show_probability:
            if w.probability is None:
                _note(axes[3], "no probability")
            else:
                axes[3].imshow(np.asarray(w.probability, dtype=np.float32), cmap="magma",
                               vmin=0.0, vmax=1.0, interpolation="nearest")
                _outline(axes[3], truth, "#2ca02c")
                axes[3].set_title("probability (0–1)", fontsize=8)
    # Agg cannot draw past 2**16 pixels a side; a very long gallery gets a lower resolution.
    return png_bytes(fig, dpi=min(100.0, 30000.0 / height))


def plot_patients(patients: Sequence[Mapping], mean: float | None = None, title: str = "") -> bytes:
    """PNG bar chart of per-patient Dice, worst at the top; the mean as a dashed line.

    Patients without tumour in truth (tumour_slices == 0) are drawn grey: their Dice is 0 or 1
    by convention, not a measure of segmentation quality.
    """
    rows = _patients_by_dice(patients)
    fig = new_figure((7.5, max(2.6, 0.22 * len(rows) + 1.4)), layout="constrained")
    ax = fig.subplots()
    if not rows:
        _note(ax, "no patients")
        return png_bytes(fig)
    values = [_number(r.get("dice")) for r in rows]
    tumour_free = [r.get("tumour_slices") == 0 for r in rows]
    y = np.arange(len(rows))
    ax.barh(y, [v or 0.0 for v in values],
            color=["#aaaaaa" if free else "#1f77b4" for free in tumour_free])
    for yi, v in zip(y, values):
        if v is None:
            ax.text(0.01, yi, "n/a", va="center", fontsize=7, color="#888888")
    ax.set_yticks(y, [_short(str(r.get("patient_id", "?")), 30) for r in rows],
                  fontsize=7 if len(rows) > 30 else 8)
    ax.invert_yaxis()  # worst first, as in the Markdown table
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("patient Dice (3-D, slices pooled)")
    handles = []
    mean = _number(mean)
    if mean is not None:
        handles.append(ax.axvline(mean, color="#d62728", linestyle="--", linewidth=1.0,
                                  label=f"mean {mean:.{_DECIMALS}f}"))
    if any(tumour_free):
        from matplotlib.patches import Patch

        handles.append(Patch(color="#aaaaaa", label="no tumour in truth"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(f"Per-patient Dice: {_short(title)}" if title else "Per-patient Dice", fontsize=11)
    return png_bytes(fig)


def plot_comparison(rows: Sequence[Mapping]) -> bytes:
    """PNG grouped bar chart of the comparison rows: the rate figures, and seconds apart
    (a different scale). Missing values get no bar and an "n/a" mark."""
    rates = [c for c in _COMPARISON if c.path is not None]
    fig = new_figure((max(9.0, 1.3 * len(rates) + 0.25 * len(rows) * len(rates)), 4.8), layout="constrained")
    ax, seconds_ax = fig.subplots(1, 2, width_ratios=[4, 1])
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(rates))
    for i, row in enumerate(rows):
        offsets = x - 0.4 + width * (i + 0.5)
        values = [_number(row.get(c.key)) for c in rates]
        bars = ax.bar(offsets, [v or 0.0 for v in values], width,
                      label=_short(str(row.get("name", i))), color=f"C{i % 10}")
        if len(rows) <= 4:  # values on the bars while they still fit
            ax.bar_label(bars, [f"{v:.3f}" if v is not None else "" for v in values], fontsize=6)
        for xo, v in zip(offsets, values):
            if v is None:
                ax.text(xo, 0.01, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x, [c.header + ("\n(lower better)" if not c.higher_is_better else "")
                      for c in rates], fontsize=8)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("score")
    ax.set_title("Models compared")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=min(len(rows), 3))
    seconds = [_number(r.get("seconds")) for r in rows]
    seconds_ax.bar(np.arange(len(rows)), [s or 0.0 for s in seconds],
                   color=[f"C{i % 10}" for i in range(len(rows))])
    seconds_ax.set_xticks(np.arange(len(rows)), [str(i + 1) for i in range(len(rows))])
    seconds_ax.set_xlabel("model (legend order)")
    seconds_ax.set_ylabel("seconds")
    seconds_ax.set_title("Inference time")
    return png_bytes(fig)


# --- JSON -------------------------------------------------------------------------------------


def _comparison_rows(evaluations: Sequence[ModelEvaluation], slugs: Sequence[str]) -> list[dict]:
    """One row per model with the comparison figures, and `best`: the columns where it wins.

    Best is judged on the values as shown (4 decimals), so rows that look tied are all bold.
    """
    rows = []
    for ev, slug in zip(evaluations, slugs):
        row: dict[str, Any] = {"name": ev.name, "slug": slug}
        for c in _COMPARISON:
            row[c.key] = _number(ev.seconds if c.path is None else _get(ev.metrics, c.path))
        rows.append(row)
    for row in rows:
        row["best"] = []
    for c in _COMPARISON:
        shown = [None if r[c.key] is None else round(r[c.key], _DECIMALS) for r in rows]
        known = [v for v in shown if v is not None]
        if not known:
            continue
        best = max(known) if c.higher_is_better else min(known)
        for row, value in zip(rows, shown):
            if value == best:
                row["best"].append(c.key)
    return rows


def _model_json(ev: ModelEvaluation, slug: str) -> dict:
    return {
        "name": ev.name,
        "slug": slug,
        "model_uri": ev.model_uri,
        "version": ev.version,
        "threshold": ev.threshold,
        "postprocess": ev.postprocess,
        "sweep": ev.sweep,
        "seconds": ev.seconds,
        "metrics": ev.metrics,
        "patients": _patient_rows(ev),
        # Pixels stay in the PNG; the JSON keeps what identifies and ranks each slice.
        "worst": [{"patient_id": w.patient_id, "slice_index": w.slice_index, "dice": w.dice,
                   "loss": w.loss} for w in _ordered_worst(ev.worst)],
        "figures": {"confusion": f"confusion_{slug}.png", "worst": f"worst_{slug}.png",
                    "patients": f"patients_{slug}.png"},
        "extra": ev.extra,
    }


# --- Markdown ---------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           align: Sequence[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _comparison_markdown(rows: Sequence[Mapping]) -> list[str]:
    body = []
    for row in rows:
        cells = [_cell(str(row.get("name", "")))]
        for c in _COMPARISON:
            text = _fmt(row.get(c.key))
            cells.append(f"**{text}**" if c.key in row.get("best", []) else text)
        body.append(cells)
    return [
        "## Comparison",
        "",
        "Best value per column in **bold**: highest, except FAR, FRR and seconds (lowest). "
        "Slice Dice is the mean over slices with tumour in truth.",
        "",
        *_table(["Model"] + [c.header for c in _COMPARISON], body,
                [":---"] + ["---:"] * len(_COMPARISON)),
        "",
        "![Comparison of the models](comparison.png)",
        "",
    ]


def _model_markdown(index: int, model: Mapping) -> list[str]:
    metrics = model.get("metrics") or {}
    figures = model.get("figures") or {}
    name = str(model.get("name", ""))
    lines = [
        f"## Model {index}: {name}",
        "",
        f"- Model: `{model.get('model_uri', '')}` (version {_fmt(model.get('version'))})",
        f"- Threshold: {_fmt(_number(model.get('threshold')))}",
        f"- Post-processing: {_postprocess_text(model.get('postprocess') or {})}",
        f"- Inference time: {_fmt(_number(model.get('seconds')))} s",
        f"- Patients: {_fmt(metrics.get('num_patients'))}, slices: {_fmt(metrics.get('num_slices'))}"
        f", with tumour: {_fmt(metrics.get('num_tumour_slices'))}",
        "",
        "### Headline figures",
        "",
        *_table(["Metric", "Value"], [[label, _fmt(_get(metrics, path))] for label, path in _HEADLINE],
                [":---", "---:"]),
        "",
    ]

    sweep = model.get("sweep") or []
    if sweep:
        best = max((_number(r.get("patient_dice_mean")) or -1.0) for r in sweep)
        lines += [
            "### Threshold sweep",
            "",
            "The same predictions and post-processing, cut at other thresholds; best patient Dice in **bold**.",
            "",
            *_table(["Threshold", "Patient Dice", "Slice Dice", "Sensitivity", "Specificity"],
                    [[_fmt(_number(r.get("threshold"))),
                      (f"**{_fmt(_number(r.get('patient_dice_mean')))}**"
                       if _number(r.get("patient_dice_mean")) == best else _fmt(_number(r.get("patient_dice_mean")))),
                      _fmt(_number(r.get("slice_dice_mean"))), _fmt(_number(r.get("sensitivity"))),
                      _fmt(_number(r.get("specificity")))] for r in sweep],
                    ["---:"] * 5),
            "",
        ]

    detection = metrics.get("detection") or {}
    tp, fn, fp, tn = (detection.get(k) for k in ("tp", "fn", "fp", "tn"))

    def total(a: Any, b: Any) -> Any:
        return a + b if a is not None and b is not None else None

    lines += [
        "### Slice detection (confusion matrix)",
        "",
        "A slice counts as positive when its mask has at least one pixel.",
        "",
        *_table(
            ["", "Predicted tumour", "Predicted no tumour", "Total"],
            [["**Truth: tumour**", _fmt(tp), _fmt(fn), _fmt(total(tp, fn))],
             ["**Truth: no tumour**", _fmt(fp), _fmt(tn), _fmt(total(fp, tn))]],
            [":---", "---:", "---:", "---:"],
        ),
        "",
        f"![Detection confusion matrix of {_cell(name)}]({figures.get('confusion', '')})",
        "",
    ]

    patients = _patients_by_dice(model.get("patients") or [])
    lines += ["### Per patient (worst Dice first)", ""]
    if patients:
        lines += [
            "Dice is the 3-D Dice of the patient's slices pooled; TP/FP/FN are pixel counts.",
            "",
            *_table(
                ["#", "Patient", "Slices", "Tumour slices", "Predicted slices", "Dice",
                 "TP", "FP", "FN"],
                [[str(i), _fmt(str(p.get("patient_id", ""))), _fmt(p.get("slices")),
                  _fmt(p.get("tumour_slices")), _fmt(p.get("predicted_slices")), _fmt(p.get("dice")),
                  _fmt(p.get("tp")), _fmt(p.get("fp")), _fmt(p.get("fn"))]
                 for i, p in enumerate(patients, start=1)],
                ["---:", ":---"] + ["---:"] * 7,
            ),
        ]
    else:
        lines.append("No patients.")
    lines += ["", f"![Per-patient Dice of {_cell(name)}]({figures.get('patients', '')})", ""]

    worst = model.get("worst") or []
    lines += ["### Worst slices (highest loss first)", ""]
    if worst:
        lines += _table(
            ["#", "Patient", "Slice", "Dice", "Loss"],
            [[str(i), _fmt(str(w.get("patient_id", ""))), _fmt(w.get("slice_index")),
              _fmt(w.get("dice")), _fmt(w.get("loss"))] for i, w in enumerate(worst, start=1)],
            ["---:", ":---", "---:", "---:", "---:"],
        )
    else:
        lines.append("No slices listed.")
    lines += ["", f"![Worst slices of {_cell(name)}]({figures.get('worst', '')})", ""]

    if model.get("extra"):
        lines += ["### Extra", "", "```json", json.dumps(model["extra"], indent=2), "```", ""]
    return lines


def _postprocess_text(options: Mapping) -> str:
    steps = []
    if options.get("min_component_px"):
        steps.append(f"2-D components under {options['min_component_px']} px dropped")
    if options.get("min_component_peak"):
        steps.append(f"2-D components peaking under {options['min_component_peak']:g} dropped")
    if options.get("largest_component_3d"):
        fraction = options.get("keep_3d_fraction", 1.0)
        steps.append("largest 3-D component per patient kept" if fraction >= 1.0 else
                     f"3-D components of at least {fraction:g} of the largest kept")
    if options.get("tta"):
        steps.append("flip test-time augmentation")
    return "; ".join(steps) if steps else "none"


def render_markdown(report: Mapping) -> str:
    """report.md from the report dict that `write_report` returns (or a loaded report.json)."""
    models = report.get("models") or []
    lines = [
        "# Evaluation report",
        "",
        f"- Data: `{report.get('data', '')}`",
        f"- Split: {_fmt(report.get('split'))}",
        f"- Created: {report.get('created_at', 'n/a')}",
        f"- Models: {len(models)}",
        "",
    ]
    if len(models) > 1:
        lines += _comparison_markdown(report.get("comparison") or [])
    for index, model in enumerate(models, start=1):
        lines += _model_markdown(index, model)
    return "\n".join(lines).rstrip("\n") + "\n"


# --- the report -------------------------------------------------------------------------------


def write_report(out: str, evaluations: list[ModelEvaluation], *, data: str, split: str | None = None,
                 s3: storage.S3Options | None = None) -> dict:
    """Write under `out` (local folder or s3:// prefix): report.json, report.md, and per model
    (index i, file-safe slug of the name) confusion_<slug>.png, worst_<slug>.png, patients_<slug>.png.
    With more than one model also a comparison table (in report.md and report.json["comparison"]), and
    comparison.png (bar chart of the main figures per model). Returns the JSON dict written.

    With a single model report.json["comparison"] is []. Raises ValueError without evaluations.
    """
    evaluations = list(evaluations)
    if not evaluations:
        raise ValueError("write_report needs at least one ModelEvaluation")
    slugs = unique_slugs([ev.name for ev in evaluations])

    files: dict[str, bytes] = {}
    models = []
    for ev, slug in zip(evaluations, slugs):
        model = _model_json(ev, slug)
        figures = model["figures"]
        files[figures["confusion"]] = plot_confusion(_get(ev.metrics, ("detection",)), ev.name)
        files[figures["worst"]] = plot_worst(_ordered_worst(ev.worst), ev.name)
        files[figures["patients"]] = plot_patients(
            model["patients"], _get(ev.metrics, ("patient_dice_mean",)), ev.name)
        models.append(model)

    comparison = _comparison_rows(evaluations, slugs) if len(evaluations) > 1 else []
    if comparison:
        files["comparison.png"] = plot_comparison(comparison)

    report = _jsonable({
        "kind": REPORT_KIND,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": data,
        "split": split,
        "models": models,
        "comparison": comparison,
    })
    files["report.md"] = render_markdown(report).encode("utf-8")
    # allow_nan=False: a NaN that slipped past _jsonable fails here, not in a reader's parser.
    text = json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False) + "\n"

    # report.json goes last, so its presence means the report is complete.
    for name, payload in files.items():
        storage.write_bytes(storage.join(out, name), payload, s3=s3)
    storage.write_bytes(storage.join(out, "report.json"), text.encode("utf-8"), s3=s3)
    return report
