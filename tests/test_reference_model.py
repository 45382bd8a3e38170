"""The shipped reference model: its size, its card, and the card's validation figures reproduced
by `brainseg evaluate` on the real validation patients it names."""

from __future__ import annotations

import json
import re

import pytest

from brainseg_ray.models.reference import REFERENCE_DIR, reference_model

pytestmark = pytest.mark.skipif(reference_model() is None, reason=f"no reference model shipped at {REFERENCE_DIR}")

CARD = REFERENCE_DIR / "MODEL_CARD.md"


def _card_row(label: str) -> list[float]:
    """The figures of the card's table row that starts with `label`."""
    row = next(line for line in CARD.read_text().splitlines() if line.startswith(f"| {label}"))
    return [float(cell) for cell in re.findall(r"\|\s*([01]\.\d{4})\s*(?=\|)", row)]


def test_artifact_loads_and_is_small_enough():
    from brainseg_ray.models.artifact import load_artifact

    artifact = load_artifact("reference")
    meta = artifact.metadata
    assert sum(f.stat().st_size for f in REFERENCE_DIR.iterdir()) <= 20 * 1024 * 1024
    assert meta["dtype"] == "float16" and 0 < meta["threshold"] < 1
    assert set(meta["postprocess"]) == {"min_component_px", "largest_component_3d"}
    # The card states what model.json says.
    text = CARD.read_text()
    assert f"Threshold | {meta['threshold']:g} " in text
    assert f"`{meta['model']['name']}`" in text and f"at {meta['input']['size']} px" in text
    if meta["model"]["name"] == "unet":  # the plain U-Net's width is part of its name on the card
        assert f"`base_filters={meta['model']['base_filters']}`" in text
    assert "Not a medical device" in text and "CC BY-NC-SA 4.0" in text and "jobs/reference_model.sh" in text


def test_the_rebuild_script_names_what_shipped():
    from brainseg_ray.models.artifact import load_artifact

    meta = load_artifact("reference").metadata
    script = (REFERENCE_DIR.parents[1] / "jobs" / "reference_model.sh").read_text()
    assert f"THRESHOLD={meta['threshold']:g}\n" in script
    assert f"--model {meta['model']['name']}" in script and f"image_size={meta['input']['size']}" in script
    post = meta["postprocess"]
    assert ("--largest-component-3d" if post["largest_component_3d"] else "--no-largest-component-3d") in script
    assert f"--min-component-px {post['min_component_px']}" in script


@pytest.mark.shared_data
def test_evaluate_reproduces_the_cards_validation_figures(shared_root, ray_local, tmp_path):
    from brainseg_ray.config import EvaluateConfig, IngestConfig
    from brainseg_ray.data.ingest import ingest
    from brainseg_ray.evaluate.run import evaluate
    from brainseg_ray.models.artifact import load_artifact

    val = load_artifact("reference").metadata["training"]["split"]["val"]
    source = tmp_path / "val" / "kaggle_3m"
    source.mkdir(parents=True)
    for patient in val:  # only the validation patients, linked rather than copied
        (source / patient).symlink_to(shared_root / patient, target_is_directory=True)
    data = ingest(IngestConfig(source=str(tmp_path / "val"), out=str(tmp_path / "dataset"))).out
    report = evaluate(EvaluateConfig(models=["reference"], data=data, out=str(tmp_path / "report"),
                                     worst_slices=0)).report
    metrics = report["models"][0]["metrics"]
    assert sorted(metrics["patient_dice"]) == sorted(val)
    dice, slice_dice, precision, recall, sensitivity, specificity = _card_row("validation")
    assert metrics["patient_dice_mean"] == pytest.approx(dice, abs=2e-4)
    assert metrics["slice_dice_mean"] == pytest.approx(slice_dice, abs=2e-4)
    assert metrics["pixel"]["precision"] == pytest.approx(precision, abs=2e-4)
    assert metrics["pixel"]["recall"] == pytest.approx(recall, abs=2e-4)
    assert metrics["detection"]["sensitivity"] == pytest.approx(sensitivity, abs=2e-4)
    assert metrics["detection"]["specificity"] == pytest.approx(specificity, abs=2e-4)
    assert json.loads((tmp_path / "report" / "report.json").read_text())["models"][0]["postprocess"][
        "largest_component_3d"] is True
