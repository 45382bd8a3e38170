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

The figures come from evaluate/figures.py; PNG bytes go through `storage.write_bytes`, so an
s3:// destination works like a local one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timezone
from typing import Any

import numpy as np

from brainseg_ray import storage
from brainseg_ray.evaluate.evaluation import (
    COMPARISON,
    DECIMALS,
    ModelEvaluation,
    cell_text,
    finite_number,
    lookup,
    ordered_worst,
    patient_rows,
    patients_by_dice,
    table_text,
)
from brainseg_ray.evaluate.figures import plot_comparison, plot_confusion, plot_patients, plot_worst

__all__ = ["render_markdown", "slugify", "unique_slugs", "write_report"]

REPORT_KIND = "brainseg-ray evaluation"


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


# --- JSON -------------------------------------------------------------------------------------


def _comparison_rows(evaluations: Sequence[ModelEvaluation], slugs: Sequence[str]) -> list[dict]:
    """One row per model with the comparison figures, and `best`: the columns where it wins.

    Best is judged on the values as shown (4 decimals), so rows that look tied are all bold.
    """
    rows = []
    for ev, slug in zip(evaluations, slugs):
        row: dict[str, Any] = {"name": ev.name, "slug": slug}
        for c in COMPARISON:
            row[c.key] = finite_number(ev.seconds if c.path is None else lookup(ev.metrics, c.path))
        rows.append(row)
    for row in rows:
        row["best"] = []
    for c in COMPARISON:
        shown = [None if r[c.key] is None else round(r[c.key], DECIMALS) for r in rows]
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
        "patients": patient_rows(ev),
        # Pixels stay in the PNG; the JSON keeps what identifies and ranks each slice.
        "worst": [{"patient_id": w.patient_id, "slice_index": w.slice_index, "dice": w.dice,
                   "loss": w.loss} for w in ordered_worst(ev.worst)],
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
        cells = [cell_text(str(row.get("name", "")))]
        for c in COMPARISON:
            text = table_text(row.get(c.key))
            cells.append(f"**{text}**" if c.key in row.get("best", []) else text)
        body.append(cells)
    return [
        "## Comparison",
        "",
        "Best value per column in **bold**: highest, except FAR, FRR and seconds (lowest). "
        "Slice Dice is the mean over slices with tumour in truth.",
        "",
        *_table(["Model"] + [c.header for c in COMPARISON], body,
                [":---"] + ["---:"] * len(COMPARISON)),
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
        f"- Model: `{model.get('model_uri', '')}` (version {table_text(model.get('version'))})",
        f"- Threshold: {table_text(finite_number(model.get('threshold')))}",
        f"- Post-processing: {postprocess_text(model.get('postprocess') or {})}",
        f"- Inference time: {table_text(finite_number(model.get('seconds')))} s",
        f"- Patients: {table_text(metrics.get('num_patients'))}, slices: {table_text(metrics.get('num_slices'))}"
        f", with tumour: {table_text(metrics.get('num_tumour_slices'))}",
        "",
        "### Headline figures",
        "",
        *_table(["Metric", "Value"], [[label, table_text(lookup(metrics, path))] for label, path in _HEADLINE],
                [":---", "---:"]),
        "",
    ]

    sweep = model.get("sweep") or []
    if sweep:
        best = max((finite_number(r.get("patient_dice_mean")) or -1.0) for r in sweep)
        lines += [
            "### Threshold sweep",
            "",
            "The same predictions and post-processing, cut at other thresholds; best patient Dice in **bold**.",
            "",
            *_table(["Threshold", "Patient Dice", "Slice Dice", "Sensitivity", "Specificity"],
                    [[table_text(finite_number(r.get("threshold"))),
                      (f"**{table_text(finite_number(r.get('patient_dice_mean')))}**"
                       if finite_number(r.get("patient_dice_mean")) == best else table_text(finite_number(r.get("patient_dice_mean")))),
                      table_text(finite_number(r.get("slice_dice_mean"))), table_text(finite_number(r.get("sensitivity"))),
                      table_text(finite_number(r.get("specificity")))] for r in sweep],
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
            [["**Truth: tumour**", table_text(tp), table_text(fn), table_text(total(tp, fn))],
             ["**Truth: no tumour**", table_text(fp), table_text(tn), table_text(total(fp, tn))]],
            [":---", "---:", "---:", "---:"],
        ),
        "",
        f"![Detection confusion matrix of {cell_text(name)}]({figures.get('confusion', '')})",
        "",
    ]

    patients = patients_by_dice(model.get("patients") or [])
    lines += ["### Per patient (worst Dice first)", ""]
    if patients:
        lines += [
            "Dice is the 3-D Dice of the patient's slices pooled; TP/FP/FN are pixel counts.",
            "",
            *_table(
                ["#", "Patient", "Slices", "Tumour slices", "Predicted slices", "Dice",
                 "TP", "FP", "FN"],
                [[str(i), table_text(str(p.get("patient_id", ""))), table_text(p.get("slices")),
                  table_text(p.get("tumour_slices")), table_text(p.get("predicted_slices")), table_text(p.get("dice")),
                  table_text(p.get("tp")), table_text(p.get("fp")), table_text(p.get("fn"))]
                 for i, p in enumerate(patients, start=1)],
                ["---:", ":---"] + ["---:"] * 7,
            ),
        ]
    else:
        lines.append("No patients.")
    lines += ["", f"![Per-patient Dice of {cell_text(name)}]({figures.get('patients', '')})", ""]

    worst = model.get("worst") or []
    lines += ["### Worst slices (highest loss first)", ""]
    if worst:
        lines += _table(
            ["#", "Patient", "Slice", "Dice", "Loss"],
            [[str(i), table_text(str(w.get("patient_id", ""))), table_text(w.get("slice_index")),
              table_text(w.get("dice")), table_text(w.get("loss"))] for i, w in enumerate(worst, start=1)],
            ["---:", ":---", "---:", "---:", "---:"],
        )
    else:
        lines.append("No slices listed.")
    lines += ["", f"![Worst slices of {cell_text(name)}]({figures.get('worst', '')})", ""]

    if model.get("extra"):
        lines += ["### Extra", "", "```json", json.dumps(model["extra"], indent=2), "```", ""]
    return lines


def postprocess_text(options: Mapping) -> str:
    """The post-processing steps in words, in the order they run; 'none' without any."""
    steps = ["flip test-time augmentation"] if options.get("tta") else []
    if options.get("min_component_px"):
        steps.append(f"2-D components under {options['min_component_px']} px dropped")
    if options.get("min_component_peak"):
        steps.append(f"2-D components peaking under {options['min_component_peak']:g} dropped")
    if options.get("largest_component_3d"):
        fraction = options.get("keep_3d_fraction", 1.0)
        steps.append("largest 3-D component per patient kept" if fraction >= 1.0 else
                     f"3-D components of at least {fraction:g} of the largest kept")
    return "; ".join(steps) if steps else "none"


def render_markdown(report: Mapping) -> str:
    """report.md from the report dict that `write_report` returns (or a loaded report.json)."""
    models = report.get("models") or []
    lines = [
        "# Evaluation report",
        "",
        f"- Data: `{report.get('data', '')}`",
        f"- Split: {table_text(report.get('split'))}",
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
        files[figures["confusion"]] = plot_confusion(lookup(ev.metrics, ("detection",)), ev.name)
        files[figures["worst"]] = plot_worst(ordered_worst(ev.worst), ev.name)
        files[figures["patients"]] = plot_patients(
            model["patients"], lookup(ev.metrics, ("patient_dice_mean",)), ev.name)
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
