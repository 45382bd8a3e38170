"""jobs/reference_cv.py: the rounds of a cross-validation pooled into one set of figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "reference_cv.py"
reference_cv = load_script(SCRIPT)


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


STUB_BRAINSEG = r'''#!PYTHON
"""A stand-in for the brainseg CLI that records each call and writes the files the scripts read:
what jobs/reference_cv.sh CHOICE=pooled does in which order, without hours of training."""
import json, os, sys
from pathlib import Path

cmd, args = sys.argv[1], sys.argv[2:]
opt = lambda name: args[args.index(name) + 1] if name in args else None
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps([cmd, *args]) + "\n")
def metrics(patients):
    return {"patient_dice": {p: 0.5 for p in patients}, "detection": {"tp": 1, "fp": 0, "fn": 0, "tn": 1},
            "pixel": {"tp": 1, "fp": 0, "fn": 0, "tn": 1}, "num_slices": 2, "num_tumour_slices": 1,
            "slice_dice_mean": 0.5}
if cmd == "split":
    k = int(opt("--test-fold"))
    Path(opt("--out")).parent.mkdir(parents=True, exist_ok=True)
    Path(opt("--out")).write_text(json.dumps({"splits": {f"p{i}": "test" if i == k else "train" for i in range(5)}}))
elif cmd == "train":
    (Path(opt("--out")) / "model").mkdir(parents=True, exist_ok=True)
    (Path(opt("--out")) / "model" / "model.json").write_text(json.dumps({"weights_sha256": "retrained"}))
elif cmd == "export":
    Path(opt("--out")).mkdir(parents=True, exist_ok=True)
    (Path(opt("--out")) / "model.json").write_text(json.dumps({"model": {"name": os.environ["MODEL"]}}))
elif cmd == "evaluate":
    splits = json.loads(Path(opt("--split-file")).read_text())["splits"]
    Path(opt("--out")).mkdir(parents=True, exist_ok=True)
    patients = [p for p, s in splits.items() if s == opt("--split")]
    (Path(opt("--out")) / "report.json").write_text(json.dumps({"models": [{"metrics": metrics(patients)}]}))
elif cmd == "segment":
    Path(opt("--output")).mkdir(parents=True, exist_ok=True)
elif cmd == "score":
    patients = sorted(p.name for p in (Path(opt("--truth")) / "kaggle_3m").iterdir())
    Path(opt("--out")).write_text(json.dumps({"metrics": metrics(patients)}))
'''


def _grid_of(patient: str, best: str, dice: tuple[float, float] = (0.9, 0.4)) -> dict:
    """A round's grid of two candidates, `best` the better on its patient (Dice: best's, the other's)."""
    def candidate(name: str, threshold: float, px: int) -> dict:
        m = _metrics({patient: dice[0] if name == best else dice[1]}, (1, 0, 0, 1), (1, 0, 0, 1))
        return {"name": name, "stage": "stage2" if name == "late" else "stage1", "threshold": threshold,
                "postprocess": {"min_component_px": px, "min_component_peak": 0.0, "largest_component_3d": True,
                                "keep_3d_fraction": 1.0, "tta": False}, "metrics": m}
    return {"patients": [patient], "candidates": [candidate("early", 0.5, 0), candidate("late", 0.3, 64)]}


STUB_GRID = r'''"""A stand-in for jobs/reference_grid.py: the round's test patient's grid (favouring `early`),
naming the stage models it scored, as the real one does."""
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
patient = next(p for p, s in json.loads((work / "split.json").read_text())["splits"].items() if s == "test")
grid = json.loads(TEMPLATE.replace("PATIENT", patient))
grid["models"] = {s: json.loads((work / s / "model" / "model.json").read_text())["weights_sha256"]
                  for s in ("stage1", "stage2")}
(work / "grid.json").write_text(json.dumps(grid))
'''


@pytest.fixture
def pooled_run(tmp_path):
    """A WORK whose five rounds trained and scored their grids (rounds 0-2 favour `late`, 3-4
    `early`, round 4 strongly), a stub brainseg on a PATH without a browser, and the data folder's
    patients."""
    work, bin_dir, data = tmp_path / "work", tmp_path / "bin", tmp_path / "data"
    jobs = shutil.copytree(SCRIPT.parent, tmp_path / "jobs")  # the scripts, reference_grid.py stubbed
    (jobs / "reference_grid.py").write_text(STUB_GRID.replace(
        "TEMPLATE", repr(json.dumps(_grid_of("PATIENT", "early")))))
    bin_dir.mkdir()
    for tool in ("bash", "cp", "mkdir", "dirname", "seq", "find", "head", "ln", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "brainseg").write_text(STUB_BRAINSEG.replace("PYTHON", sys.executable))
    (bin_dir / "brainseg").chmod(0o755)
    (work / "dataset").mkdir(parents=True)
    (work / "dataset" / "manifest.json").write_text("{}")
    for k in range(5):
        (data / "kaggle_3m" / f"p{k}").mkdir(parents=True)
        for stage in ("stage1", "stage2"):
            (work / f"fold-{k}" / stage / "model").mkdir(parents=True)
            (work / f"fold-{k}" / stage / "model" / "model.json").write_text(json.dumps({"weights_sha256": f"{k}{stage}"}))
        grid = _grid_of(f"p{k}", "late" if k < 3 else "early", (0.95, 0.1) if k == 4 else (0.9, 0.4))
        grid["models"] = {"stage1": f"{k}stage1", "stage2": f"{k}stage2"}
        (work / f"fold-{k}" / "grid.json").write_text(json.dumps(grid))

    def run(*folds: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PATH": str(bin_dir), "MODEL": "unet-efficientnet-lite2", "CHOICE": "pooled",
               "RECORDS": str(tmp_path / "records"), "PYTHON": sys.executable, "STUB_LOG": str(tmp_path / "log")}
        return subprocess.run(["bash", str(jobs / "reference_cv.sh"), str(data), str(work), *folds],
                              env=env, capture_output=True, text=True, timeout=120)
    return run, work, tmp_path


def _calls(tmp_path: Path) -> list[list[str]]:
    return [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]


def test_pooled_rounds_choose_on_the_others_grids_then_export_and_score_with_it(pooled_run):
    run, work, tmp_path = pooled_run
    done = run("0", "3")
    assert done.returncode == 0, done.stderr
    # Each round's own patient favours the other candidate: the other rounds' patients outvote it
    # (round 0: late scores 0.9 + 0.9 + 0.4 + 0.1 there, early 0.4 + 0.4 + 0.9 + 0.95).
    for k, expected in ((0, "early"), (3, "late")):
        chosen = json.loads((work / f"fold-{k}" / "chosen.json").read_text())
        assert chosen["name"] == expected and f"fold-{k}" not in chosen["chosen_on"] and len(chosen["chosen_on"]) == 4
        assert (tmp_path / "records" / f"fold-{k}" / "chosen.json").read_text() == \
            (work / f"fold-{k}" / "chosen.json").read_text()
        assert (tmp_path / "records" / f"fold-{k}" / "test-exported" / "report.json").is_file()
    exports = [c for c in _calls(tmp_path) if c[0] == "export"]
    assert [c[1] for c in exports] == [str(work / "fold-0" / "stage1" / "model"), str(work / "fold-3" / "stage2" / "model")]
    assert exports[0][exports[0].index("--threshold") + 1] == "0.5"
    assert exports[1][exports[1].index("--threshold") + 1] == "0.3"
    assert exports[1][exports[1].index("--min-component-px") + 1] == "64" and "--largest-component-3d" in exports[1]
    calls = _calls(tmp_path)
    assert not [c for c in calls if c[0] == "train"]  # trained rounds are not trained again
    assert not [c for c in calls if c[0] == "evaluate" and "--split" in c and c[c.index("--split") + 1] == "val"
                and "choice" in c[c.index("--out") + 1]]  # no validation choice
    pooled = json.loads((work / "cv-score.json").read_text())["segment"]
    assert pooled["rounds"] == ["fold-0", "fold-3"] and sorted(pooled["patient_dice"]) == ["p0", "p3"]
    assert not (work / "final").exists()  # the final model waits for all five rounds


def test_a_pooled_round_waits_for_every_other_rounds_grid(pooled_run):
    run, work, tmp_path = pooled_run
    (work / "fold-4" / "grid.json").unlink()
    shutil.rmtree(work / "fold-4" / "stage2")  # round 4 is still training
    done = run("1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == \
        "reference_cv.sh: round 1 chooses once the other 4 rounds have a grid; round 4 has none (rerun with it)"
    assert not (work / "fold-1" / "chosen.json").exists() and not (tmp_path / "log").exists()
    assert not (work / "cv-score.json").exists()


def test_a_pooled_round_chooses_on_a_retrained_rounds_grid_then_that_rounds_grid_is_scored_again(pooled_run):
    # Round 2's stage 2 was trained again since its grid was scored: its grid is still evidence for
    # round 1 (named in round 1's choice), but round 2 scores its grid again before it is exported.
    run, work, tmp_path = pooled_run
    (work / "fold-2" / "stage2" / "model" / "model.json").write_text(json.dumps({"weights_sha256": "again"}))
    done = run("1")
    assert done.returncode == 0, done.stderr
    chosen = json.loads((work / "fold-1" / "chosen.json").read_text())
    assert chosen["grid_models"]["fold-2"] == {"stage1": "2stage1", "stage2": "2stage2"}
    assert not [c for c in _calls(tmp_path) if c[0] == "train"]
    done = run("2")
    assert done.returncode == 0, done.stderr
    assert "round 2: stage2's model is not the one its grid scored: training it" in done.stdout
    # Both stages are trained (a finished stage is kept): the grid is scored on them.
    assert json.loads((work / "fold-2" / "grid.json").read_text())["models"] == {"stage1": "2stage1",
                                                                                "stage2": "again"}
    assert json.loads((work / "fold-2" / "chosen.json").read_text())["chosen_on"] == ["fold-0", "fold-1", "fold-3",
                                                                                      "fold-4"]
    pooled = json.loads((work / "cv-score.json").read_text())["segment"]
    assert pooled["rounds"] == ["fold-1", "fold-2"]


def test_a_pooled_round_in_a_new_work_folder_chooses_on_the_recorded_grids(pooled_run):
    # A new session: only round 4's models are here (it just trained); the others' grids are records.
    run, work, tmp_path = pooled_run
    for k in range(4):
        (tmp_path / "records" / f"fold-{k}").mkdir(parents=True)
        shutil.move(work / f"fold-{k}" / "grid.json", tmp_path / "records" / f"fold-{k}" / "grid.json")
        shutil.rmtree(work / f"fold-{k}")
    done = run("4")
    assert done.returncode == 0, done.stderr
    assert not [c for c in _calls(tmp_path) if c[0] == "train"]
    chosen = json.loads((work / "fold-4" / "chosen.json").read_text())
    assert chosen["chosen_on"] == ["fold-0", "fold-1", "fold-2", "fold-3"] and chosen["name"] == "late"
    assert (tmp_path / "records" / "fold-4" / "test-exported" / "report.json").is_file()
    assert json.loads((work / "cv-score.json").read_text())["segment"]["rounds"] == ["fold-4"]
    assert not (work / "final").exists()


def test_a_round_restored_without_its_models_trains_and_is_scored_again_before_any_choice(pooled_run):
    # Round 4's grid is from its record; the models it scored are not on this machine.
    run, work, tmp_path = pooled_run
    for stage in ("stage1", "stage2"):
        shutil.rmtree(work / "fold-4" / stage)
    done = run("4")
    assert done.returncode == 0, done.stderr
    assert "round 4: stage1's model, which its grid scored, is not here: training it" in done.stdout
    calls = _calls(tmp_path)
    trained = [c[c.index("--out") + 1] for c in calls if c[0] == "train"]
    assert trained == [str(work / "fold-4" / "stage1"), str(work / "fold-4" / "stage2")]
    grid = json.loads((work / "fold-4" / "grid.json").read_text())
    assert grid["models"] == {"stage1": "retrained", "stage2": "retrained"}  # scored again, on the new models
    assert (tmp_path / "records" / "fold-4" / "grid.json").read_text() == (work / "fold-4" / "grid.json").read_text()
    # Then chosen on the other four grids, exported and scored.
    assert json.loads((work / "fold-4" / "chosen.json").read_text())["chosen_on"] == ["fold-0", "fold-1", "fold-2",
                                                                                      "fold-3"]
    assert [c[0] for c in calls if c[0] in ("export", "segment", "score")] == ["export", "segment", "score"]


def test_train_only_stops_after_the_two_stages(pooled_run):
    run, work, tmp_path = pooled_run
    env = {**os.environ, "PATH": str(tmp_path / "bin"), "PYTHON": sys.executable, "STUB_LOG": str(tmp_path / "log"),
           "MODEL": "unet-efficientnet-lite2", "TRAIN_ONLY": "1", "DATASET": str(work / "dataset"),
           "SPLIT": "--folds 5 --test-fold 2 --fractions 0.875,0.125,0 --seed 0"}
    done = subprocess.run(["bash", str(SCRIPT.parent / "reference_model.sh"), str(tmp_path / "data"),
                           str(tmp_path / "new-round")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = _calls(tmp_path)
    assert [c[0] for c in calls] == ["split", "train", "train"]
    assert calls[1][calls[1].index("--out") + 1] == str(tmp_path / "new-round" / "stage1")
    assert f"init_from={tmp_path / 'new-round' / 'stage1' / 'model'}" in calls[2]
    assert not (tmp_path / "new-round" / "model").exists()  # nothing chosen, nothing exported
