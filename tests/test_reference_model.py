"""The shipped reference model: its size, its card, and the card's validation figures reproduced
by `brainseg evaluate` on the real validation patients it names."""

from __future__ import annotations

import json
import re
import statistics

import pytest

from brainseg_ray.models.reference import REFERENCE_DIR, reference_model
from conftest import load_script

pytestmark = pytest.mark.skipif(reference_model() is None, reason=f"no reference model shipped at {REFERENCE_DIR}")

CARD = REFERENCE_DIR / "MODEL_CARD.md"


def _card_line(label: str) -> str:
    """The card's table row whose first cell is `label`."""
    return next(line for line in CARD.read_text().splitlines() if line.startswith(f"| {label} |"))


def _card_row(label: str) -> list[float]:
    """The figures of the card's table row whose first cell is `label`."""
    return [float(cell) for cell in re.findall(r"\|\s*([01]\.\d{4})\s*(?=\|)", _card_line(label))]


def test_artifact_loads_and_is_small_enough():
    from brainseg_ray.models.artifact import load_artifact

    artifact = load_artifact("reference")
    meta = artifact.metadata
    assert sum(f.stat().st_size for f in REFERENCE_DIR.iterdir()) <= 20 * 1024 * 1024
    assert meta["dtype"] == "float16" and 0 < meta["threshold"] < 1
    assert set(meta["postprocess"]) == {"min_component_px", "min_component_peak", "largest_component_3d",
                                        "keep_3d_fraction", "tta"}
    # The card states what model.json says, and shows the pictures it names.
    text = CARD.read_text()
    assert f"Threshold | {meta['threshold']:g} " in text
    assert f"`{meta['model']['name']}` at {meta['input']['size']} px" in text and meta["version"] in text
    assert "Not a medical device" in text and "CC BY-NC-SA 4.0" in text and "jobs/reference_model.sh" in text
    for picture in re.findall(r"\]\((worst-\d\.png)\)", text):
        assert (REFERENCE_DIR / picture).read_bytes()[:4] == b"\x89PNG"
    # No path of the machine that trained it.
    assert "/work/" not in (REFERENCE_DIR / "model.json").read_text() and "/work/" not in text


def test_the_rebuild_script_names_what_shipped():
    from brainseg_ray.models.artifact import load_artifact
    from brainseg_ray.models.inputs import normalisation_mode

    meta = load_artifact("reference").metadata
    script = (REFERENCE_DIR.parents[1] / "jobs" / "reference_model.sh").read_text()
    assert f"MODEL=${{MODEL:-{meta['model']['name']}}} " in script
    # The cross-validation script names the same default, to check its records against it.
    cv_script = (REFERENCE_DIR.parents[1] / "jobs" / "reference_cv.sh").read_text()
    assert f"MODEL=${{MODEL:-{meta['model']['name']}}} " in cv_script
    # The speed benchmarks default to its architecture (random weights: speed does not need trained ones).
    for bench in ("segment.py", "serve.py"):
        text = (REFERENCE_DIR.parents[1] / "bench" / bench).read_text()
        assert f'"--arch", default="{meta["model"]["name"]}", help="the shipped model' in text
    # The shipped threshold is where the choices start or one of the cuts they compare.
    start = re.search(r"^THRESHOLD=([0-9.]+) ", script, re.M).group(1)
    cuts = re.search(r"^THRESHOLDS=([0-9.,]+) ", script, re.M).group(1).split(",")
    assert f"{meta['threshold']:g}" in [start, *cuts]
    config = meta["training"]["config"]
    assert f"steps={config['steps']} " in script and f"lr={config['lr']:g}" in script
    # The recipe it was trained with is the one the script rebuilds (the augmentation changed once
    # without a rebuild: the script must not drift from what shipped).
    assert f"augmentation={config['augmentation']} " in script
    assert f"normalisation={normalisation_mode(meta['normalisation'])} " in script
    # Every post-processing step that shipped is among the candidates the script compares.
    post = meta["postprocess"]
    if post["min_component_peak"]:
        assert f"min_component_peak={post['min_component_peak']:g}" in script
    if post["min_component_px"]:
        assert f"min_component_px={post['min_component_px']}" in script
    if post["largest_component_3d"] and post["keep_3d_fraction"] < 1:
        assert f"keep_3d_fraction={post['keep_3d_fraction']:g}" in script
    if post["tta"]:
        assert "tta=true" in script


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
    # fp32, as the card's figures were computed: the same on CPUs with and without bf16. Two
    # half-CPU actors (one thread each, a CPU left to the read stage) keep both cores predicting.
    report = evaluate(EvaluateConfig(models=["reference"], data=data, out=str(tmp_path / "report"),
                                     worst_slices=0, precision="fp32", concurrency=2, cpus_per_actor=0.5)).report
    metrics = report["models"][0]["metrics"]
    assert sorted(metrics["patient_dice"]) == sorted(val)
    dice, median, slice_dice, precision, recall, sensitivity, specificity = _card_row("validation")
    assert metrics["patient_dice_mean"] == pytest.approx(dice, abs=2e-4)
    assert statistics.median(metrics["patient_dice"].values()) == pytest.approx(median, abs=2e-4)
    assert metrics["slice_dice_mean"] == pytest.approx(slice_dice, abs=2e-4)
    assert metrics["pixel"]["precision"] == pytest.approx(precision, abs=2e-4)
    assert metrics["pixel"]["recall"] == pytest.approx(recall, abs=2e-4)
    assert metrics["detection"]["sensitivity"] == pytest.approx(sensitivity, abs=2e-4)
    assert metrics["detection"]["specificity"] == pytest.approx(specificity, abs=2e-4)
    meta = load_artifact("reference").metadata
    assert json.loads((tmp_path / "report" / "report.json").read_text())["models"][0]["postprocess"] == \
        meta["postprocess"]


def _records_of_shipped_model():
    """The cross-validation records (docs/reference-cv/MODEL) of the shipped model's recipe."""
    from brainseg_ray.models.artifact import load_artifact

    root = REFERENCE_DIR.parents[1]
    reference_cv = load_script(root / "jobs" / "reference_cv.py")
    name = load_artifact("reference").metadata["model"]["name"]
    return reference_cv, sorted((root / "docs" / "reference-cv" / name).glob("fold-*"))


def test_the_cards_cross_validation_figures_are_its_recipes_records():
    """The card's pooled rows and its rounds table, recomputed from the records in the repository:
    the figures the shipped model is judged by cannot drift from the rounds that made them."""
    text = CARD.read_text()
    if "| cross-validation (evaluate)" not in text:
        pytest.skip("the shipped card reports its own test patients, not a cross-validation")
    reference_cv, rounds = _records_of_shipped_model()
    assert len(rounds) == 5
    pooled = reference_cv.pool_rounds(rounds)
    for label, key in (("cross-validation (evaluate)", "evaluate"), ("cross-validation (segment mask files)",
                                                                      "segment")):
        m = pooled[key]
        assert _card_row(label) == pytest.approx(
            [m["patient_dice_mean"], m["patient_dice_median"], m["slice_dice_mean"], m["pixel"]["precision"],
             m["pixel"]["recall"], m["detection"]["sensitivity"], m["detection"]["specificity"]], abs=1e-4)
    web = pooled["web"]
    assert f"{web['tumour_free'] - web['tumour_free_said_present']} of {web['tumour_free']} tumour-free" in text
    for record in rounds:
        metrics = json.loads((record / "test-exported" / "report.json").read_text())["models"][0]["metrics"]
        settings = json.loads((record / "model" / "model.json").read_text())
        label = record.name.replace("fold-", "")
        assert _card_row(label)[:2] == pytest.approx([metrics["patient_dice_mean"],
                                                      statistics.median(metrics["patient_dice"].values())], abs=1e-4)
        assert f"threshold {settings['threshold']:g};" in _card_line(label)
    # Every patient of the data set scored once, by a round that never saw it.
    assert pooled["segment"]["num_patients"] == 50
