"""jobs/reference_cv.py: the rounds of a cross-validation pooled into one set of figures."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "reference_cv.py"
spec = importlib.util.spec_from_file_location("reference_cv", SCRIPT)
reference_cv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference_cv)


def _metrics(dice: dict[str, float], detection: tuple[int, int, int, int], pixel: tuple[int, int, int, int],
             slice_dice: float | None = 0.5, tumour_slices: int = 1) -> dict:
    """The metrics of `brainseg score` or `brainseg evaluate`, with just the fields the pooling reads."""
    return {"patient_dice": dice, "detection": dict(zip(("tp", "fp", "fn", "tn"), detection)),
            "pixel": dict(zip(("tp", "fp", "fn", "tn"), pixel)), "num_slices": sum(detection),
            "num_tumour_slices": tumour_slices, "slice_dice_mean": slice_dice}


def _round(work: Path, name: str, segment: dict, evaluate: dict, web: dict | None = None) -> None:
    (work / name / "test-exported").mkdir(parents=True)
    (work / name / "test-score.json").write_text(json.dumps({"metrics": segment}))
    (work / name / "test-exported" / "report.json").write_text(json.dumps({"models": [{"metrics": evaluate}]}))
    if web is not None:
        (work / name / "web-check.json").write_text(json.dumps(web))


def _web(free: int, free_present: list[str], tumour: int, tumour_present: int) -> dict:
    return {"tumour_free": free, "tumour_free_said_present": len(free_present), "tumour": tumour,
            "tumour_said_present": tumour_present, "tumour_free_files_said_present": free_present}


def test_rounds_pool_into_every_patient_once_and_summed_counts(tmp_path):
    first = _metrics({"a": 0.9, "b": 0.0}, (8, 1, 2, 9), (90, 10, 30, 1000), slice_dice=0.6, tumour_slices=10)
    second = _metrics({"c": 0.6}, (2, 1, 0, 10), (10, 0, 10, 500), slice_dice=0.3, tumour_slices=2)
    _round(tmp_path, "fold-0", first, {**first, "patient_dice": {"a": 0.9005, "b": 0.0}}, _web(9, ["x.tif"], 10, 9))
    _round(tmp_path, "fold-1", second, second, _web(11, [], 2, 2))
    assert reference_cv.main(tmp_path) == 0
    pooled = json.loads((tmp_path / "cv-score.json").read_text())
    segment = pooled["segment"]
    assert segment["rounds"] == ["fold-0", "fold-1"] and segment["num_patients"] == 3
    assert segment["patient_dice_mean"] == pytest.approx(0.5) and segment["patient_dice_median"] == pytest.approx(0.6)
    assert segment["patients_under_0.5"] == ["b"]
    assert segment["detection"]["sensitivity"] == pytest.approx(10 / 12)  # (8 + 2) / (8 + 2 + 2 + 0)
    assert segment["detection"]["specificity"] == pytest.approx(19 / 21)
    assert segment["pixel"]["precision"] == pytest.approx(100 / 110)
    assert segment["pixel"]["recall"] == pytest.approx(100 / 140)
    assert segment["slice_dice_mean"] == pytest.approx((0.6 * 10 + 0.3 * 2) / 12)  # weighed by tumour slices
    assert segment["num_slices"] == 33 and segment["num_tumour_slices"] == 12
    assert pooled["evaluate"]["patient_dice"]["a"] == 0.9005
    assert pooled["largest_dice_difference"] == pytest.approx(0.0005)
    web = pooled["web"]
    assert (web["tumour_free"], web["tumour_free_said_present"], web["tumour"], web["tumour_said_present"]) == \
        (20, 1, 12, 11)
    assert web["tumour_free_said_absent_share"] == pytest.approx(19 / 20)
    assert web["tumour_free_files_said_present"] == ["x.tif"]


def test_no_web_check_is_none_and_a_round_without_tumour_slices_counts(tmp_path):
    free = _metrics({"d": 1.0}, (0, 0, 0, 12), (0, 0, 0, 100), slice_dice=None, tumour_slices=0)
    _round(tmp_path, "fold-0", free, free)
    pooled = reference_cv.pool_rounds([tmp_path / "fold-0"])
    assert pooled["web"] is None and pooled["segment"]["slice_dice_mean"] is None
    assert pooled["segment"]["detection"]["sensitivity"] is None
    assert pooled["segment"]["detection"]["specificity"] == 1.0


def test_a_patient_in_two_rounds_is_refused():
    with pytest.raises(ValueError, match="fold-1: patients already scored in another round: a"):
        reference_cv.pool({"fold-0": _metrics({"a": 0.9}, (1, 0, 0, 1), (1, 0, 0, 1)),
                           "fold-1": _metrics({"a": 0.8}, (1, 0, 0, 1), (1, 0, 0, 1))})


def test_mask_files_and_evaluate_scoring_different_patients_is_refused(tmp_path):
    _round(tmp_path, "fold-0", _metrics({"a": 0.9}, (1, 0, 0, 1), (1, 0, 0, 1)),
           _metrics({"b": 0.9}, (1, 0, 0, 1), (1, 0, 0, 1)))
    with pytest.raises(ValueError, match=r"scored different patients: \['a', 'b'\]"):
        reference_cv.pool_rounds([tmp_path / "fold-0"])


def test_no_rounds_is_one_line_and_exit_2(tmp_path, capsys):
    assert reference_cv.main(tmp_path) == 2
    assert "no fold-*/test-score.json" in capsys.readouterr().err


def _record(folder: Path, model: str, patients: dict[str, float]) -> None:
    """A finished round as jobs/reference_cv.sh keeps it: scores, web check, split and exported settings."""
    m = _metrics(patients, (1, 0, 0, 1), (1, 0, 0, 1))
    _round(folder.parent, folder.name, m, m, _web(1, [], 1, 1))
    (folder / "model").mkdir()
    (folder / "model" / "model.json").write_text(json.dumps({"model": {"name": model}}))
    (folder / "split.json").write_text(json.dumps({"splits": {p: "test" for p in patients}}))


def _cv_script(data: Path, work: Path, records: Path, model: str, *folds: str,
               path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL": model, "RECORDS": str(records), "PYTHON": sys.executable}
    if path is not None:
        env["PATH"] = str(path)
    return subprocess.run(["bash", str(SCRIPT.with_suffix(".sh")), str(data), str(work), *folds],
                          env=env, capture_output=True, text=True, timeout=120)


RECORDED = ("split.json", "test-score.json", "test-exported/report.json", "web-check.json", "model/model.json")


def test_recorded_rounds_are_restored_and_finished_rounds_recorded_then_pooled(tmp_path):
    # Round 0 ran elsewhere (only its record is here), round 1 ran in this WORK: neither trains again.
    records, work = tmp_path / "records", tmp_path / "work"
    _record(records / "fold-0", "unet-efficientnet-lite2", {"a": 0.9, "b": 0.7})
    _record(work / "fold-1", "unet-efficientnet-lite2", {"c": 0.5})
    (work / "fold-1" / "stage1").mkdir()  # its train history goes into the record (the card's compute)
    (work / "fold-1" / "stage1" / "history.json").write_text('[{"train_seconds": 60, "val_seconds": 1}]')
    done = _cv_script(tmp_path / "no-data", work, records, "unet-efficientnet-lite2", "0", "1")
    assert done.returncode == 0, done.stderr
    assert "round 0: restored from" in done.stdout and "round 1: restored" not in done.stdout
    for name in RECORDED:
        assert (work / "fold-0" / name).read_text() == (records / "fold-0" / name).read_text()
        assert (records / "fold-1" / name).read_text() == (work / "fold-1" / name).read_text()
    assert (records / "fold-1" / "stage1" / "history.json").read_text() == \
        (work / "fold-1" / "stage1" / "history.json").read_text()
    assert not (records / "fold-1" / "stage2").exists()  # what a round lacks is not made up
    pooled = json.loads((work / "cv-score.json").read_text())["segment"]
    assert pooled["rounds"] == ["fold-0", "fold-1"] and pooled["num_patients"] == 3
    assert pooled["patient_dice_mean"] == pytest.approx(0.7)
    assert not (work / "final").exists()  # the final model waits for all five rounds


def test_a_record_of_another_model_is_refused(tmp_path):
    records, work = tmp_path / "records", tmp_path / "work"
    _record(records / "fold-0", "unet-efficientnet-lite2", {"a": 0.9})
    done = _cv_script(tmp_path / "no-data", work, records, "unet-efficientnet-lite0", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"reference_cv.sh: {records / 'fold-0'} is a round of unet-efficientnet-lite2, "
                                   "not of MODEL=unet-efficientnet-lite0")
    assert not (work / "fold-0").exists()


def test_a_round_without_chromium_is_warned_of_before_it_runs(tmp_path):
    """Without the browser a round still runs and pools, but says so up front, not after its hours
    of training; a round whose web check is recorded is not warned of."""
    records, work, bin_dir = tmp_path / "records", tmp_path / "work", tmp_path / "bin"
    _record(work / "fold-1", "unet-efficientnet-lite2", {"c": 0.5})
    (work / "fold-1" / "web-check.json").unlink()
    _record(records / "fold-0", "unet-efficientnet-lite2", {"a": 0.9})
    bin_dir.mkdir()
    for tool in ("bash", "cp", "mkdir", "dirname", "seq"):  # a PATH with what the script needs, no browser
        (bin_dir / tool).symlink_to(shutil.which(tool))
    done = _cv_script(tmp_path / "no-data", work, records, "unet-efficientnet-lite2", "0", "1", path=bin_dir)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "reference_cv.sh: round 1 gets no web check: chromium and chromedriver are not on PATH "
        "(make browser, then rerun the same command to add it)"]
    assert not (work / "fold-1" / "web-check.json").exists()
    assert json.loads((work / "cv-score.json").read_text())["segment"]["num_patients"] == 2
