"""Training history: one row per epoch, written as history.json, history.csv and curves.png.

Rewritten after every epoch, so an interrupted run still leaves readable curves.
"""

from __future__ import annotations

import csv
import io
import json

from brainseg_ray import storage
from brainseg_ray.plotting import new_figure, png_bytes

HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
CURVES_PNG = "curves.png"


def write_history(out: str, rows: list[dict], s3: storage.S3Options | None = None) -> None:
    storage.write_bytes(storage.join(out, HISTORY_JSON), json.dumps(rows, indent=1).encode(), s3)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(storage.join(out, HISTORY_CSV), text.getvalue().encode(), s3)
    storage.write_bytes(storage.join(out, CURVES_PNG), plot_curves(rows), s3)


def read_history(out: str, s3: storage.S3Options | None = None) -> list[dict]:
    return json.loads(storage.read_bytes(storage.join(out, HISTORY_JSON), s3))


def plot_curves(rows: list[dict]) -> bytes:
    """Loss (train and validation) and validation Dice against the epoch, as PNG bytes."""
    epochs = [r["epoch"] for r in rows]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]

    fig = new_figure((10, 4))
    ax_loss, ax_dice = fig.subplots(1, 2)
    ax_loss.plot(epochs, series("train_loss"), marker="o", label="train")
    ax_loss.plot(epochs, series("val_loss"), marker="o", label="validation")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_loss.legend()
    ax_dice.plot(epochs, series("val_patient_dice"), marker="o", label="per-patient 3-D Dice")
    ax_dice.plot(epochs, series("val_slice_dice"), marker=".", label="slice Dice (tumour slices)")
    best = [r for r in rows if r.get("is_best")]
    if best:
        ax_dice.axvline(best[-1]["epoch"], color="grey", linestyle=":", label=f"best (epoch {best[-1]['epoch']})")
    ax_dice.set(title="validation Dice", xlabel="epoch", ylim=(0, 1))
    ax_dice.legend(loc="lower right")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    fig.tight_layout()
    return png_bytes(fig)
