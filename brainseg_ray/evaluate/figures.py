"""The evaluation report's figures, as PNG bytes: the slice-detection confusion matrix, the
worst-slice gallery, per-patient Dice and the comparison of several models.

Drawn on brainseg_ray.plotting's bare Agg figures (no display, nothing leaks when many reports are
written in one process); the gallery takes the FLAIR channel from brainseg_ray.rendering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from brainseg_ray.evaluate.evaluation import (
    COMPARISON,
    DECIMALS,
    WorstSlice,
    finite_number,
    patients_by_dice,
    shortened,
    table_text,
)
from brainseg_ray.plotting import new_figure, png_bytes
from brainseg_ray.rendering import flair_channel

__all__ = ["plot_comparison", "plot_confusion", "plot_patients", "plot_worst"]


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
            rate_text = "n/a" if np.isnan(rate) else f"{rate:.{DECIMALS}f}"
            ax.text(j, i, f"{counts[i, j]}\n{names[i][j]} {rate_text}", ha="center", va="center",
                    fontsize=11, color="white" if rate > 0.6 else "black")
    ax.set_xticks([0, 1], ["predicted tumour", "predicted no tumour"])
    ax.set_yticks([0, 1], ["truth tumour", "truth no tumour"])
    ax.set_title(f"Slice detection: {shortened(title)}" if title else "Slice detection", fontsize=11)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the truth row")
    return png_bytes(fig)


# The gallery layers translucent masks over the unstretched FLAIR on matplotlib axes, where
# rendering.overlay burns one mask into the pixels of a stretched slice (the segment job's files).
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
            fig.suptitle(shortened(title), fontsize=10)
        return png_bytes(fig)

    show_probability = any(w.probability is not None for w in worst)
    columns = 4 if show_probability else 3
    row_height = 2.9
    height = row_height * len(worst) + (0.4 if title else 0.0)
    fig = new_figure((2.6 * columns, height), layout="constrained")
    if title:
        fig.suptitle(f"Worst slices: {shortened(title)}", fontsize=12)
    rows = fig.subfigures(len(worst), 1, squeeze=False)[:, 0]
    for rank, (sub, w) in enumerate(zip(rows, worst), start=1):
        flair = flair_channel(w.image)
        truth = np.asarray(w.truth) > 0
        pred = np.asarray(w.prediction) > 0
        if truth.shape != flair.shape or pred.shape != flair.shape:
            raise ValueError(
                f"{w.patient_id} slice {w.slice_index}: image {flair.shape}, truth {truth.shape} "
                f"and prediction {pred.shape} must have the same height and width"
            )
        sub.suptitle(f"#{rank} {w.patient_id} · slice {w.slice_index} · Dice {table_text(finite_number(w.dice))}"
                     f" · loss {table_text(finite_number(w.loss))}", fontsize=9)
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
    rows = patients_by_dice(patients)
    fig = new_figure((7.5, max(2.6, 0.22 * len(rows) + 1.4)), layout="constrained")
    ax = fig.subplots()
    if not rows:
        _note(ax, "no patients")
        return png_bytes(fig)
    values = [finite_number(r.get("dice")) for r in rows]
    tumour_free = [r.get("tumour_slices") == 0 for r in rows]
    y = np.arange(len(rows))
    ax.barh(y, [v or 0.0 for v in values],
            color=["#aaaaaa" if free else "#1f77b4" for free in tumour_free])
    for yi, v in zip(y, values):
        if v is None:
            ax.text(0.01, yi, "n/a", va="center", fontsize=7, color="#888888")
    ax.set_yticks(y, [shortened(str(r.get("patient_id", "?")), 30) for r in rows],
                  fontsize=7 if len(rows) > 30 else 8)
    ax.invert_yaxis()  # worst first, as in the Markdown table
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("patient Dice (3-D, slices pooled)")
    handles = []
    mean = finite_number(mean)
    if mean is not None:
        handles.append(ax.axvline(mean, color="#d62728", linestyle="--", linewidth=1.0,
                                  label=f"mean {mean:.{DECIMALS}f}"))
    if any(tumour_free):
        from matplotlib.patches import Patch

        handles.append(Patch(color="#aaaaaa", label="no tumour in truth"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(f"Per-patient Dice: {shortened(title)}" if title else "Per-patient Dice", fontsize=11)
    return png_bytes(fig)


def plot_comparison(rows: Sequence[Mapping]) -> bytes:
    """PNG grouped bar chart of the comparison rows: the rate figures, and seconds apart
    (a different scale). Missing values get no bar and an "n/a" mark."""
    rates = [c for c in COMPARISON if c.path is not None]
    fig = new_figure((max(9.0, 1.3 * len(rates) + 0.25 * len(rows) * len(rates)), 4.8), layout="constrained")
    ax, seconds_ax = fig.subplots(1, 2, width_ratios=[4, 1])
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(rates))
    for i, row in enumerate(rows):
        offsets = x - 0.4 + width * (i + 0.5)
        values = [finite_number(row.get(c.key)) for c in rates]
        bars = ax.bar(offsets, [v or 0.0 for v in values], width,
                      label=shortened(str(row.get("name", i))), color=f"C{i % 10}")
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
    seconds = [finite_number(r.get("seconds")) for r in rows]
    seconds_ax.bar(np.arange(len(rows)), [s or 0.0 for s in seconds],
                   color=[f"C{i % 10}" for i in range(len(rows))])
    seconds_ax.set_xticks(np.arange(len(rows)), [str(i + 1) for i in range(len(rows))])
    seconds_ax.set_xlabel("model (legend order)")
    seconds_ax.set_ylabel("seconds")
    seconds_ax.set_title("Inference time")
    return png_bytes(fig)
