"""Evaluation report rendering: real files, real PNGs, metrics from the real SegmentationMetrics."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from brainseg_ray import storage
from brainseg_ray.evaluate.evaluation import ModelEvaluation, WorstSlice
from brainseg_ray.evaluate.figures import plot_worst
from brainseg_ray.evaluate.report import slugify, unique_slugs, write_report
from brainseg_ray.train import metrics as m

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZE = 32
SLICES = 6  # per patient: the first half with tumour, the rest tumour-free


# --- realistic inputs -------------------------------------------------------------------------


def blob(shift: int = 0, at: int = 8, side: int = 10) -> np.ndarray:
    """A side x side square lesion, moved `shift` pixels right: Dice vs shift 0 is (side-shift)/side."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[at:at + side, at + shift:at + shift + side] = 1
    return mask


def build_evaluation(name: str, shifts: list[int], *, false_alarms: int = 0, seconds: float = 1.0,
                     worst_count: int = 3, probability: bool = False, seed: int = 0,
                     tumour_free_patient: bool = True) -> ModelEvaluation:
    """Patients TCGA_XX_000k whose predictions are the truth moved shifts[k] pixels (so the
    per-patient Dice falls as k rises) plus `false_alarms` small blobs on tumour-free slices;
    optionally one patient with no tumour at all. Metrics come from SegmentationMetrics."""
    rng = np.random.default_rng(seed)
    acc = m.SegmentationMetrics()
    patients, slices = [], []
    cases = [(f"TCGA_XX_{k:04d}", shift) for k, shift in enumerate(shifts)]
    if tumour_free_patient:
        cases.append(("TCGA_ZZ_9999", None))
    for index, (pid, shift) in enumerate(cases):
        truths = np.zeros((SLICES, SIZE, SIZE), dtype=np.uint8)
        preds = np.zeros_like(truths)
        if shift is not None:
            for i in range(SLICES // 2):
                truths[i], preds[i] = blob(), blob(shift)
            for i in range(SLICES // 2, SLICES // 2 + false_alarms):
                preds[i] = blob(0, at=2, side=3)
        acc.update([pid] * SLICES, preds, truths)
        counts = m.pixel_counts(preds, truths)
        patients.append({
            "patient_id": pid, "slices": SLICES,
            "tumour_slices": int(truths.any(axis=(1, 2)).sum()),
            "predicted_slices": int(preds.any(axis=(1, 2)).sum()),
            "dice": counts.dice, "tp": counts.tp, "fp": counts.fp, "fn": counts.fn,
        })
        for i in range(SLICES):
            d = m.dice(preds[i], truths[i])
            slices.append(WorstSlice(
                patient_id=pid, slice_index=i, dice=d,
                loss=1.0 - d + 0.001 * i + 0.0001 * index,  # no ties
                image=rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
                truth=truths[i], prediction=preds[i],
                probability=rng.random((SIZE, SIZE), dtype=np.float32) if probability else None,
            ))
    worst = sorted(slices, key=lambda w: -w.loss)[:worst_count]
    rng.shuffle(worst)  # the renderer must order the gallery itself
    return ModelEvaluation(
        name=name, model_uri=f"s3://models/{name}", version="3", threshold=0.5,
        metrics=acc.compute(), patients=patients[::-1], worst=worst, seconds=seconds,
        extra={"split": "test", "fingerprint": "abc123"},
    )


# --- reading the output -----------------------------------------------------------------------


def table_after(md: str, heading: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first Markdown table after the line `heading`."""
    lines = md.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif rows:
            break
        elif line.startswith("#"):
            raise AssertionError(f"no table under {heading!r}")
    return rows[2:]  # drop header and alignment rows


def assert_png(data: bytes) -> np.ndarray:
    assert data.startswith(PNG_SIGNATURE)
    pixels = mpimg.imread(io.BytesIO(data), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 0 and pixels.shape[1] > 0
    return pixels


def fmt(x: float) -> str:
    return f"{x:.4f}"


@pytest.fixture(scope="module")
def one_model(tmp_path_factory):
    """One report shared by the read-only checks below (rendering is the slow part)."""
    ev = build_evaluation("UNet ResNet34", [1, 2, 3, 4], false_alarms=1, probability=True)
    out = tmp_path_factory.mktemp("one") / "report"
    report = write_report(str(out), [ev], data="s3://lgg/kaggle_3m", split="test")
    return ev, out, report


# --- one model --------------------------------------------------------------------------------


def test_one_model_files_and_json_round_trip(one_model):
    ev, out, report = one_model
    slug = "unet-resnet34"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "report.json", "report.md", f"confusion_{slug}.png", f"worst_{slug}.png", f"patients_{slug}.png",
    ])
    loaded = json.loads((out / "report.json").read_text())
    assert loaded == report
    assert loaded["kind"] == "brainseg-ray evaluation"
    assert (loaded["data"], loaded["split"], loaded["comparison"]) == ("s3://lgg/kaggle_3m", "test", [])
    assert loaded["created_at"].endswith("+00:00")
    [model] = loaded["models"]
    assert model["metrics"] == ev.metrics  # every value, nested dicts included
    assert model["metrics"]["patient_dice"] == ev.metrics["patient_dice"]
    assert model["patients"] == ev.patients
    assert (model["name"], model["model_uri"], model["version"]) == (ev.name, ev.model_uri, "3")
    assert (model["threshold"], model["seconds"], model["extra"]) == (0.5, 1.0, ev.extra)
    assert model["figures"] == {"confusion": f"confusion_{slug}.png", "worst": f"worst_{slug}.png",
                                "patients": f"patients_{slug}.png"}
    # worst slices: identifiers and scores only, highest loss first
    assert [set(w) for w in model["worst"]] == [{"patient_id", "slice_index", "dice", "loss"}] * 3
    losses = [w["loss"] for w in model["worst"]]
    assert losses == sorted((w.loss for w in ev.worst), reverse=True)


def test_pngs_are_real_images(one_model):
    _, out, report = one_model
    for name in report["models"][0]["figures"].values():
        assert_png((out / name).read_bytes())


def test_markdown_headline_and_confusion(one_model):
    ev, out, _ = one_model
    md = (out / "report.md").read_text()
    mx = ev.metrics
    assert md.startswith("# Evaluation report\n")
    assert "- Data: `s3://lgg/kaggle_3m`" in md and "- Split: test" in md
    assert "## Comparison" not in md  # one model: no comparison
    headline = dict(table_after(md, "### Headline figures"))
    assert headline["Patient Dice (mean)"] == fmt(mx["patient_dice_mean"])
    assert headline["Patient Dice (mean over tumour patients)"] == fmt(mx["patient_dice_mean_tumour"])
    assert headline["Slice Dice (mean over tumour slices)"] == fmt(mx["slice_dice_mean"])
    assert headline["Slice IoU (mean over tumour slices)"] == fmt(mx["slice_iou_mean"])
    assert headline["Pixel precision"] == fmt(mx["pixel"]["precision"])
    assert headline["Detection FAR (false alarm rate)"] == fmt(mx["detection"]["far"])
    assert headline["Detection sensitivity"] == "1.0000"
    assert f"| Patient Dice (mean) | {fmt(mx['patient_dice_mean'])} |" in md

    det = mx["detection"]
    # 4 tumour patients x 3 tumour slices, all detected; 1 false alarm each; 5 patients x 6 slices
    assert (det["tp"], det["fn"], det["fp"], det["tn"]) == (12, 0, 4, 14)
    confusion = table_after(md, "### Slice detection (confusion matrix)")
    assert confusion == [["**Truth: tumour**", "12", "0", "12"],
                         ["**Truth: no tumour**", "4", "14", "18"]]
    for kind in ("confusion", "patients", "worst"):
        assert f"]({kind}_unet-resnet34.png)" in md


def test_markdown_patients_worst_first(one_model):
    ev, out, _ = one_model
    rows = table_after((out / "report.md").read_text(), "### Per patient (worst Dice first)")
    dices = [float(r[5]) for r in rows]
    assert dices == sorted(dices)
    expected = sorted(ev.patients, key=lambda p: p["dice"])
    assert [r[1] for r in rows] == [p["patient_id"] for p in expected]
    # the input came in id order reversed, which is neither ascending nor descending Dice
    assert [p["patient_id"] for p in ev.patients] != [r[1] for r in rows]
    first = expected[0]
    assert rows[0] == ["1", first["patient_id"], "6", "3", "4", fmt(first["dice"]),
                       str(first["tp"]), str(first["fp"]), str(first["fn"])]


def test_markdown_worst_slices_by_loss(one_model):
    ev, out, _ = one_model
    rows = table_after((out / "report.md").read_text(), "### Worst slices (highest loss first)")
    assert [float(r[4]) for r in rows] == sorted((round(w.loss, 4) for w in ev.worst), reverse=True)
    top = max(ev.worst, key=lambda w: w.loss)
    assert rows[0][1:4] == [top.patient_id, str(top.slice_index), fmt(top.dice)]


# --- None / NaN -------------------------------------------------------------------------------


def test_none_and_nan_render_as_na_and_null(tmp_path):
    # No tumour anywhere: the real metrics have None for tumour-only figures and detection rates.
    ev = build_evaluation("empty", [], tumour_free_patient=True, seconds=np.float64(1.5))
    mx = ev.metrics
    assert mx["patient_dice_mean_tumour"] is None and mx["detection"]["sensitivity"] is None
    mx["patient_dice_mean"] = float("nan")
    mx["pixel"]["precision"] = np.float32("nan")
    mx["pixel"]["recall"] = np.float64(0.25)
    mx["num_slices"] = np.int64(mx["num_slices"])
    ev.patients[0]["dice"] = math.nan
    ev.extra["weights"] = np.array([0.5, np.nan])

    report = write_report(str(tmp_path), [ev], data="local", split=None)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded == report
    got = loaded["models"][0]
    assert got["metrics"]["patient_dice_mean"] is None
    assert got["metrics"]["patient_dice_mean_tumour"] is None
    assert got["metrics"]["slice_dice_mean"] is None
    assert got["metrics"]["pixel"]["precision"] is None
    assert got["metrics"]["pixel"]["recall"] == 0.25
    assert got["metrics"]["detection"]["sensitivity"] is None
    assert type(got["metrics"]["num_slices"]) is int and got["metrics"]["num_slices"] == 6
    assert got["seconds"] == 1.5 and got["patients"][0]["dice"] is None
    assert got["extra"]["weights"] == [0.5, None]
    assert loaded["split"] is None

    md = (tmp_path / "report.md").read_text()
    headline = dict(table_after(md, "### Headline figures"))
    for label in ("Patient Dice (mean)", "Patient Dice (mean over tumour patients)",
                  "Slice Dice (mean over tumour slices)", "Pixel precision", "Detection sensitivity",
                  "Detection FRR (false rejection rate)"):
        assert headline[label] == "n/a", label
    assert headline["Pixel recall"] == "0.2500"
    assert headline["Detection FAR (false alarm rate)"] == "0.0000"
    assert "- Split: n/a" in md
    [patient] = table_after(md, "### Per patient (worst Dice first)")
    assert patient[5] == "n/a"


# --- several models ---------------------------------------------------------------------------


def test_two_models_comparison(tmp_path):
    # "sharp": better Dice, but false alarms; "cautious": worse Dice, no false alarms, slower.
    sharp = build_evaluation("sharp", [1, 2, 3, 4], false_alarms=2, seconds=2.0)
    cautious = build_evaluation("cautious", [3, 4, 5, 6], false_alarms=0, seconds=5.0, seed=1)
    assert sharp.metrics["detection"]["far"] > cautious.metrics["detection"]["far"] == 0.0
    assert sharp.metrics["slice_dice_mean"] > cautious.metrics["slice_dice_mean"]

    report = write_report(str(tmp_path), [sharp, cautious], data="d", split="val")
    assert_png((tmp_path / "comparison.png").read_bytes())
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Comparison") < md.index("## Model 1: sharp") < md.index("## Model 2: cautious")
    assert "](comparison.png)" in md

    header = next(line for line in md.splitlines() if line.startswith("| Model |"))
    assert header == ("| Model | Patient Dice | Patient Dice (tumour) | Slice Dice | Sensitivity | "
                      "Specificity | FAR | FRR | Seconds |")
    rows = {r[0]: r[1:] for r in table_after(md, "## Comparison")}
    s, c = rows["sharp"], rows["cautious"]
    bold = lambda x: f"**{fmt(x)}**"  # noqa: E731
    # Dice columns: highest wins
    assert s[2] == bold(sharp.metrics["slice_dice_mean"])
    assert c[2] == fmt(cautious.metrics["slice_dice_mean"])
    assert s[1] == bold(sharp.metrics["patient_dice_mean_tumour"])
    # FAR: lowest wins, so the cautious model is bold and the sharp one is not
    assert c[5] == "**0.0000**" and s[5] == fmt(sharp.metrics["detection"]["far"])
    assert c[4] == "**1.0000**" and not s[4].startswith("**")  # specificity
    # both find every tumour slice: a tie, both bold
    assert s[3] == c[3] == "**1.0000**" and s[6] == c[6] == "**0.0000**"
    # seconds: lowest wins
    assert s[7] == "**2.0000**" and c[7] == "5.0000"

    comparison = json.loads((tmp_path / "report.json").read_text())["comparison"]
    assert comparison == report["comparison"]
    assert [r["name"] for r in comparison] == ["sharp", "cautious"]
    assert comparison[0]["slice_dice_mean"] == sharp.metrics["slice_dice_mean"]
    assert comparison[1]["far"] == 0.0 and comparison[1]["seconds"] == 5.0
    assert "far" in comparison[1]["best"] and "far" not in comparison[0]["best"]
    assert "slice_dice_mean" in comparison[0]["best"]


def test_comparison_skips_missing_values(tmp_path):
    no_tumour = build_evaluation("no-tumour", [], seconds=1.0)
    normal = build_evaluation("normal", [2, 3], seconds=3.0)
    write_report(str(tmp_path), [no_tumour, normal], data="d")
    rows = {r[0]: r[1:] for r in table_after((tmp_path / "report.md").read_text(), "## Comparison")}
    assert rows["no-tumour"][1] == "n/a"  # patient Dice over tumour patients: none
    assert rows["normal"][1] == f"**{fmt(normal.metrics['patient_dice_mean_tumour'])}**"
    assert rows["no-tumour"][7] == "**1.0000**"


def test_same_names_get_distinct_slugs_and_files(tmp_path):
    a = build_evaluation("UNet / ResNet34", [1, 2])
    b = build_evaluation("UNet / ResNet34", [3, 4], worst_count=1)
    c = build_evaluation("unet-resnet34", [2, 2])
    report = write_report(str(tmp_path), [a, b, c], data="d")
    slugs = [model["slug"] for model in report["models"]]
    assert slugs == ["unet-resnet34", "unet-resnet34-2", "unet-resnet34-3"]
    figures = [model["figures"]["worst"] for model in report["models"]]
    assert len(set(figures)) == 3
    for slug in slugs:
        for kind in ("confusion", "worst", "patients"):
            assert_png((tmp_path / f"{kind}_{slug}.png").read_bytes())
    # different galleries: 3 rows vs 1 row
    assert (mpimg.imread(tmp_path / "worst_unet-resnet34.png").shape[0]
            > mpimg.imread(tmp_path / "worst_unet-resnet34-2.png").shape[0])


def test_slugify():
    assert slugify("s3://Bucket/Models/UNet v3.safetensors") == "s3-bucket-models-unet-v3.safetensors"
    assert slugify("Modèle №1") == "modele-no1"
    assert slugify("../..") == "model" and slugify("") == "model"
    assert slugify("/" + "a" * 100 + "/v3") == ("a" * 100 + "-v3")[-64:]
    assert unique_slugs(["x", "X", "x-2", "x"]) == ["x", "x-2", "x-2-2", "x-3"]


# --- worst gallery ----------------------------------------------------------------------------


def test_empty_worst_list(tmp_path):
    ev = build_evaluation("none-worst", [1], worst_count=0)
    assert ev.worst == []
    report = write_report(str(tmp_path), [ev], data="d")
    assert report["models"][0]["worst"] == []
    pixels = assert_png((tmp_path / "worst_none-worst.png").read_bytes())
    assert pixels.shape[0] < 300  # the small "no slices" figure
    md = (tmp_path / "report.md").read_text()
    assert "No slices listed." in md and "](worst_none-worst.png)" in md


def test_worst_gallery_shape_follows_rows_and_probability():
    plain = build_evaluation("p", [1, 2], worst_count=4).worst
    with_prob = build_evaluation("q", [1, 2], worst_count=4, probability=True).worst
    four = assert_png(plot_worst(plain))
    one = assert_png(plot_worst(plain[:1]))
    prob = assert_png(plot_worst(with_prob))
    assert four.shape[0] > 3 * one.shape[0]  # one row per slice
    assert prob.shape[1] > four.shape[1]  # a fourth column for the probability map
    with pytest.raises(ValueError, match="same height and width"):
        bad = plain[0]
        plot_worst([WorstSlice(bad.patient_id, 0, 0.0, 1.0, bad.image, bad.truth[:8], bad.prediction)])


def test_no_evaluations_is_an_error(tmp_path):
    with pytest.raises(ValueError):
        write_report(str(tmp_path), [], data="d")
    assert not any(Path(tmp_path).iterdir())


# --- S3 ---------------------------------------------------------------------------------------


def test_write_to_s3(s3_bucket):
    first = build_evaluation("first", [1, 2])
    second = build_evaluation("second", [2, 3])
    out = storage.join(s3_bucket, "reports", "run-1")
    report = write_report(out, [first, second], data="s3://lgg/kaggle_3m", split="test")
    loaded = json.loads(storage.read_bytes(storage.join(out, "report.json")))
    assert loaded == report
    assert loaded["models"][0]["metrics"] == first.metrics
    listed = {member.path for member in storage.open_source(out).list().members}
    assert listed == {"report.json", "report.md", "comparison.png"} | {
        f"{kind}_{slug}.png"
        for kind in ("confusion", "worst", "patients") for slug in ("first", "second")
    }
    assert_png(storage.read_bytes(storage.join(out, "comparison.png")))
    assert "## Comparison" in storage.read_bytes(storage.join(out, "report.md")).decode()
