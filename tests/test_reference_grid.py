"""jobs/reference_grid.py: every candidate setting of a build scored on its test patients, the
pooled choice's evidence; each candidate's figures are `brainseg evaluate`'s at its settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script, tiny_artifact

JOBS = Path(__file__).resolve().parents[1] / "jobs"
reference_grid = load_script(JOBS / "reference_grid.py")


def test_the_candidates_are_every_combination_once_simplest_first():
    rows = reference_grid.candidates()
    assert len(rows) == 2 * 2 * 3 * 4 * 3 and len({r["name"] for r in rows}) == len(rows)
    assert rows[0]["name"] == "stage1 none 0.5 3d-none"
    assert rows[0]["postprocess"] == {"min_component_px": 0, "min_component_peak": 0.0,
                                      "largest_component_3d": False, "keep_3d_fraction": 1.0, "tta": False}
    fifth = next(r for r in rows if r["name"] == "stage2 tta-px64 0.3 3d-fifth")
    assert fifth["stage"] == "stage2" and fifth["threshold"] == 0.3
    assert fifth["postprocess"] == {"min_component_px": 64, "min_component_peak": 0.0,
                                    "largest_component_3d": True, "keep_3d_fraction": 0.2, "tta": True}


@pytest.fixture(scope="module")
def build(synthetic_dataset, tmp_path_factory) -> Path:
    """A build folder as jobs/reference_model.sh leaves it after training: two stages (a real and an
    untrained model, so the stage matters) and a split with two test patients."""
    from brainseg_ray.data.tables import tumour_slices_by_patient
    from brainseg_ray.models.reference import reference_model

    if reference_model() is None:
        pytest.skip("no reference model is shipped in this installation")
    work = tmp_path_factory.mktemp("build")
    (work / "stage1").mkdir()
    (work / "stage1" / "model").symlink_to(reference_model(), target_is_directory=True)
    tiny_artifact(work / "stage2" / "model", seed=3)
    patients = sorted(tumour_slices_by_patient(synthetic_dataset))
    splits = {p: ("test" if i < 2 else "train") for i, p in enumerate(patients)}
    (work / "split.json").write_text(json.dumps({"splits": splits}))
    return work


def test_each_candidates_figures_are_what_evaluate_gives_at_its_settings(build, synthetic_dataset, tmp_path):
    from brainseg_ray.config import EvaluateConfig
    from brainseg_ray.evaluate.run import evaluate

    result = reference_grid.grid(build, synthetic_dataset)
    assert result["patients"] == sorted(json.loads((build / "split.json").read_text())["splits"])[:2]
    rows = {r["name"]: r for r in result["candidates"]}
    assert len(rows) == 144
    # The weights it scored, by which a retrained round's grid is known to be stale.
    assert result["models"] == {s: json.loads((build / s / "model" / "model.json").read_text())["weights_sha256"]
                                for s in ("stage1", "stage2")}
    assert result["models"]["stage1"] != result["models"]["stage2"]
    for name in ("stage1 none 0.5 3d-none", "stage1 tta-peak90 0.3 3d-largest", "stage2 px64 0.2 3d-fifth"):
        row = rows[name]
        report = evaluate(EvaluateConfig(
            models=[str(build / row["stage"] / "model")], data=synthetic_dataset, out=str(tmp_path / name),
            split_file=str(build / "split.json"), split="test", threshold=row["threshold"], precision="fp32",
            worst_slices=0, **row["postprocess"])).report
        expected = report["models"][0]["metrics"]
        got = row["metrics"]
        assert got["patient_dice"] == pytest.approx(expected["patient_dice"], abs=1e-9), name
        assert got["detection"] == expected["detection"], name
        assert got["pixel"]["tp"] == expected["pixel"]["tp"] and got["pixel"]["fp"] == expected["pixel"]["fp"], name
    # The settings reach the masks: the stage, the threshold and the steps change the figures.
    assert rows["stage1 none 0.5 3d-none"]["metrics"]["pixel"] != rows["stage2 none 0.5 3d-none"]["metrics"]["pixel"]
    assert rows["stage1 none 0.5 3d-none"]["metrics"]["pixel"] != rows["stage1 none 0.2 3d-none"]["metrics"]["pixel"]


def test_a_build_without_its_models_or_split_is_one_line_and_exit_2(tmp_path, synthetic_dataset):
    run = [sys.executable, str(JOBS / "reference_grid.py"), str(tmp_path), "--data", synthetic_dataset]
    no_split = subprocess.run(run, capture_output=True, text=True)
    assert no_split.returncode == 2
    assert no_split.stderr.strip() == f"reference_grid: {tmp_path / 'split.json'}: no split file " \
                                      "(the build's `brainseg split` writes it)"
    (tmp_path / "split.json").write_text(json.dumps({"splits": {"nobody": "test"}}))
    unknown = subprocess.run(run, capture_output=True, text=True)
    assert unknown.returncode == 2 and "1 patients have no labelled slices" in unknown.stderr
    assert not (tmp_path / "grid.json").exists()
