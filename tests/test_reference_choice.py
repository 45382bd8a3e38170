"""jobs/reference_choice.py: the rule the reference model's rebuild and its card choose by."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

JOBS = Path(__file__).resolve().parents[1] / "jobs"
reference_choice = load_script(JOBS / "reference_choice.py")


def _model(dice: float, specificity: float, tta: bool = False, threshold: float = 0.5,
           sweep: list[tuple[float, float, float]] = ()) -> dict:
    """One model entry of a `brainseg evaluate` report, with the fields the rule reads."""
    return {"threshold": threshold, "postprocess": {"tta": tta},
            "metrics": {"patient_dice_mean": dice, "detection": {"sensitivity": 0.9, "specificity": specificity}},
            "sweep": [{"threshold": t, "patient_dice_mean": d, "sensitivity": 0.95, "specificity": s}
                      for t, d, s in sweep]}


def _work(tmp_path: Path, models: dict[str, dict]) -> Path:
    for name, model in models.items():
        (tmp_path / "choice" / name).mkdir(parents=True)
        (tmp_path / "choice" / name / "report.json").write_text(json.dumps({"models": [model]}))
    return tmp_path


@pytest.mark.parametrize(("models", "chosen"), [
    # Dice alone would choose a, but its false-positive slices cost more than it gains.
    ({"a": _model(0.80, 0.90), "b": _model(0.78, 0.99)}, "b"),
    # Flip TTA must gain more than its cost to be chosen...
    ({"none": _model(0.80, 0.98), "tta": _model(0.805, 0.98, tta=True)}, "none"),
    ({"none": _model(0.80, 0.98), "tta": _model(0.82, 0.98, tta=True)}, "tta"),
    # ...and a tie goes to the first named, the simpler option.
    ({"first": _model(0.8, 0.9), "second": _model(0.8, 0.9)}, "first"),
    ({"second": _model(0.8, 0.9), "first": _model(0.7, 0.9)}, "second"),
])
def test_best_ranks_by_dice_plus_specificity_less_the_tta_cost(tmp_path, models, chosen):
    assert reference_choice.best(_work(tmp_path, models), list(models)) == chosen


@pytest.mark.parametrize(("model", "chosen"), [
    (_model(0.80, 0.99, sweep=[(0.4, 0.82, 0.98), (0.3, 0.85, 0.97)]), 0.3),  # more Dice than specificity lost
    (_model(0.80, 0.99, sweep=[(0.4, 0.82, 0.95)]), 0.5),  # more specificity than Dice lost
    (_model(0.80, 0.99, sweep=[(0.4, 0.81, 0.98)]), 0.5),  # a tie keeps the report's own cut
    (_model(0.80, 0.99), 0.5),  # no sweep: its own cut
    # The report's TTA is shared by every cut, so it moves none of them.
    (_model(0.80, 0.99, tta=True, sweep=[(0.2, 0.805, 0.99)]), 0.2),
])
def test_best_threshold_by_the_same_rule_over_the_reports_sweep(model, chosen):
    assert reference_choice.best_threshold(model) == chosen
    rows = reference_choice.threshold_rows(model)
    assert [r["threshold"] for r in rows] == [model["threshold"], *(r["threshold"] for r in model["sweep"])]
    assert rows[0]["score"] == pytest.approx(model["metrics"]["patient_dice_mean"] + 0.99)


def test_the_command_line_prints_what_the_script_reads(tmp_path):
    work = _work(tmp_path, {"none": _model(0.7, 0.9, sweep=[(0.2, 0.8, 0.9)]), "tta": _model(0.75, 0.9, tta=True)})
    run = [sys.executable, str(JOBS / "reference_choice.py")]
    best = subprocess.run([*run, "best", str(work), "none", "tta"], capture_output=True, text=True, check=True)
    assert best.stdout == "tta\n"
    cut = subprocess.run([*run, "threshold", str(work / "choice" / "none" / "report.json")],
                         capture_output=True, text=True, check=True)
    assert cut.stdout == "0.2\n"
    wrong = subprocess.run([*run, "rank"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "usage:" in wrong.stderr


def test_the_rebuild_script_and_the_card_choose_through_it():
    # One rule in one place: neither computes a score of its own.
    script = (JOBS / "reference_model.sh").read_text()
    assert 'reference_choice.py" best' in script and 'reference_choice.py" threshold' in script
    assert "patient_dice_mean" not in script
    card = (JOBS / "reference_card.py").read_text()
    assert "reference_choice.best(" in card and "reference_choice.threshold_rows(" in card
    assert '["specificity"]' not in card


def test_the_rebuild_script_refuses_a_model_its_card_cannot_describe(tmp_path):
    # At the start, in one line: not after an hour of training, at the card.
    run = subprocess.run(["bash", str(JOBS / "reference_model.sh"), str(tmp_path / "data"), str(tmp_path / "work")],
                         env={"PATH": "/usr/bin:/bin", "MODEL": "unet-resnet34"}, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == ("reference_model.sh: MODEL must be unet-efficientnet-lite0, -lite1 or -lite2, "
                                  "got unet-resnet34")
    assert not (tmp_path / "work").exists()


def _candidate(name: str, dice: dict[str, float], detection: tuple[int, int, int, int], tta: bool = False) -> dict:
    """One candidate of a jobs/reference_grid.py grid, with the metric fields the pooling reads."""
    return {"name": name, "stage": "stage1", "threshold": 0.5, "postprocess": {"tta": tta},
            "metrics": {"patient_dice": dice, "detection": dict(zip(("tp", "fp", "fn", "tn"), detection)),
                        "pixel": dict.fromkeys(("tp", "fp", "fn", "tn"), 1), "num_slices": sum(detection),
                        "num_tumour_slices": 1, "slice_dice_mean": 0.5}}


def _grid(*candidates: dict) -> dict:
    return {"patients": sorted(candidates[0]["metrics"]["patient_dice"]), "candidates": list(candidates)}


GRIDS = {  # on each round's own patients; "b" is better on fold-0's, "a" on the others pooled
    "fold-0": _grid(_candidate("a", {"p0": 0.2}, (1, 5, 4, 5)), _candidate("b", {"p0": 0.9}, (5, 0, 0, 10))),
    "fold-1": _grid(_candidate("a", {"p1": 0.8, "p2": 0.8}, (9, 1, 1, 9)),
                    _candidate("b", {"p1": 0.7, "p2": 0.7}, (6, 0, 4, 10))),
    "fold-2": _grid(_candidate("a", {"p3": 0.9}, (10, 0, 0, 10)), _candidate("b", {"p3": 0.85}, (8, 1, 2, 9))),
}


def test_a_round_chooses_on_the_other_rounds_patients_pooled_never_its_own():
    chosen = reference_choice.choose_pooled(GRIDS, "fold-0")
    assert chosen["name"] == "a" and chosen["chosen_on"] == ["fold-1", "fold-2"] and chosen["num_patients"] == 3
    # Dice over patients, detection from summed counts (19 of 20 tumour slices, 19 of 20 free ones).
    assert chosen["patient_dice_mean"] == pytest.approx((0.8 + 0.8 + 0.9) / 3)
    assert chosen["sensitivity"] == pytest.approx(19 / 20) and chosen["specificity"] == pytest.approx(19 / 20)
    assert chosen["score"] == pytest.approx(chosen["patient_dice_mean"] + 19 / 20 + 19 / 20)
    assert reference_choice.choose_pooled(GRIDS, "fold-1")["name"] == "b"  # fold-0's patients swing it
    final = reference_choice.choose_pooled(GRIDS, "final")  # a round without a grid: every round's patients
    assert final["chosen_on"] == ["fold-0", "fold-1", "fold-2"] and final["num_patients"] == 4


@pytest.mark.parametrize(("second", "chosen"), [
    (_candidate("tta", {"p": 0.805}, (9, 1, 1, 9), tta=True), "plain"),  # gains less than its cost
    (_candidate("tta", {"p": 0.82}, (9, 1, 1, 9), tta=True), "tta"),
    (_candidate("twin", {"p": 0.8}, (9, 1, 1, 9)), "plain"),  # a tie goes to the earlier, simpler one
    (_candidate("sensitive", {"p": 0.8}, (10, 1, 0, 9)), "sensitive"),  # sensitivity counts too
])
def test_the_pooled_rule_weighs_sensitivity_and_the_tta_cost(second, chosen):
    grids = {"fold-1": _grid(_candidate("plain", {"p": 0.8}, (9, 1, 1, 9)), second)}
    assert reference_choice.choose_pooled(grids, "fold-0")["name"] == chosen


def test_grids_of_different_candidates_or_none_to_choose_on_are_refused():
    other = {"fold-1": GRIDS["fold-1"], "fold-2": _grid(GRIDS["fold-2"]["candidates"][0])}
    with pytest.raises(ValueError, match="different candidates"):
        reference_choice.choose_pooled(other, "fold-0")
    with pytest.raises(ValueError, match="no grids besides fold-0"):
        reference_choice.choose_pooled({"fold-0": GRIDS["fold-0"]}, "fold-0")


def _trained_round(folder: Path, grid: dict, scored: dict[str, str] | None = None,
                   on_disk: dict[str, str] | None = None) -> None:
    """A round's folder: its grid, naming the weights it `scored`, and the stage models `on_disk`."""
    scored = {"stage1": "sha-1", "stage2": "sha-2"} if scored is None else scored
    on_disk = scored if on_disk is None else on_disk
    folder.mkdir(parents=True)
    (folder / "grid.json").write_text(json.dumps({**grid, **({"models": scored} if scored else {})}))
    for stage, sha in on_disk.items():
        (folder / stage / "model").mkdir(parents=True)
        (folder / stage / "model" / "model.json").write_text(json.dumps({"weights_sha256": sha}))


def test_the_pooled_command_writes_the_choice_the_rebuild_script_reads(tmp_path):
    for name, grid in GRIDS.items():
        _trained_round(tmp_path / name, grid)
    out = tmp_path / "fold-0" / "chosen.json"
    done = subprocess.run([sys.executable, str(JOBS / "reference_choice.py"), "pooled", str(tmp_path), "fold-0",
                           str(out)], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("fold-0: a (score ") and "on 3 patients of fold-1, fold-2" in done.stdout
    chosen = json.loads(out.read_text())
    assert chosen == reference_choice.choose_pooled(reference_choice.read_grids(tmp_path), "fold-0")
    assert {k: v for k, v in chosen.items() if k != "grid_models"} == \
        {k: v for k, v in reference_choice.choose_pooled(GRIDS, "fold-0").items() if k != "grid_models"}
    assert {"stage", "threshold", "postprocess"} <= set(chosen)


def test_the_card_lists_the_pooled_ranking_the_rule_made_and_marks_its_choice():
    reference_card = load_script(JOBS / "reference_card.py")
    ranked, _ = reference_choice.rank_pooled(GRIDS, "final")
    chosen = reference_choice.choose_pooled(GRIDS, "final")
    text = reference_card._pooled_choice_section(ranked, chosen)
    rows = [line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert rows == [
        f"| 1 | {ranked[0]['name']} | {ranked[0]['patient_dice_mean']:.4f} | {ranked[0]['sensitivity']:.4f} | "
        f"{ranked[0]['specificity']:.4f} | {ranked[0]['score']:.4f} | chosen |",
        f"| 2 | {ranked[1]['name']} | {ranked[1]['patient_dice_mean']:.4f} | {ranked[1]['sensitivity']:.4f} | "
        f"{ranked[1]['specificity']:.4f} | {ranked[1]['score']:.4f} |  |"]
    assert ranked[0]["score"] >= ranked[1]["score"] and ranked[0]["name"] == chosen["name"]
    assert "over the 4 patients of\nfold-0, fold-1, fold-2" in text and "of 2 candidates" in text
    limit = reference_card._choice_limit({Path("fold-0"): ("stage 1", {"threshold": 0.5, "postprocess": {}}),
                                          Path("fold-1"): ("stage 1", {"threshold": 0.3, "postprocess": {}})}, 5, chosen)
    assert limit.startswith("- The 2 rounds, each choosing on the other rounds' test patients, made 2 different")
    assert "made on all 4 patients" in limit


SHAS = {"stage1": "sha-1", "stage2": "sha-2"}


@pytest.mark.parametrize(("scored", "on_disk", "exported", "why"), [
    (SHAS, SHAS, False, None),  # the grid of the models on disk
    ({}, SHAS, False, "its grid.json does not name the models it scored"),  # a grid older than the check
    (SHAS, {"stage1": "sha-1"}, False, "stage2's model, which its grid scored, is not here"),
    (SHAS, {}, False, "stage1's model, which its grid scored, is not here"),  # restored from its record
    (SHAS, {"stage1": "sha-1", "stage2": "retrained"}, False, "stage2's model is not the one its grid scored"),
    (SHAS, {}, True, None),  # exported: chosen and scored with the models it had, its record is final
])
def test_a_grid_counts_only_with_the_models_it_scored_or_once_its_round_is_exported(tmp_path, scored, on_disk,
                                                                                    exported, why):
    _trained_round(tmp_path / "fold-0", GRIDS["fold-0"], scored, on_disk)
    if exported:
        (tmp_path / "fold-0" / "test-exported").mkdir()
        (tmp_path / "fold-0" / "test-exported" / "report.json").write_text("{}")
    assert reference_choice.grid_state(tmp_path / "fold-0") == why
    ready = subprocess.run([sys.executable, str(JOBS / "reference_choice.py"), "ready", str(tmp_path / "fold-0")],
                           capture_output=True, text=True)
    assert (ready.returncode, ready.stdout.strip()) == ((0, "") if why is None else (1, why))
    assert reference_choice.grid_state(tmp_path / "fold-9") == "no grid.json"


def test_the_pooled_command_chooses_on_other_rounds_grids_whose_models_are_gone_and_names_them(tmp_path):
    # A session that trained round 0 has only the other rounds' recorded grids: they still count,
    # and the choice records which weights each of them scored.
    _trained_round(tmp_path / "fold-0", GRIDS["fold-0"])
    _trained_round(tmp_path / "fold-1", GRIDS["fold-1"], on_disk={})
    _trained_round(tmp_path / "fold-2", GRIDS["fold-2"], scored={})
    out = tmp_path / "fold-0" / "chosen.json"
    subprocess.run([sys.executable, str(JOBS / "reference_choice.py"), "pooled", str(tmp_path), "fold-0", str(out)],
                   capture_output=True, text=True, check=True)
    chosen = json.loads(out.read_text())
    assert chosen["name"] == reference_choice.choose_pooled(GRIDS, "fold-0")["name"]
    assert chosen["chosen_on"] == ["fold-1", "fold-2"]
    assert chosen["grid_models"] == {"fold-1": SHAS, "fold-2": None}


def test_the_preview_pools_each_rounds_choice_at_its_own_grids_figures():
    shown = reference_choice.preview(GRIDS)
    # fold-0 takes a (fold-1 and fold-2 pooled); fold-1 and fold-2 take b, fold-0's patient swinging it.
    assert {name: r["name"] for name, r in shown["rounds"].items()} == {"fold-0": "a", "fold-1": "b", "fold-2": "b"}
    assert shown["rounds"]["fold-1"]["patient_dice_mean"] == pytest.approx(0.7)
    assert shown["rounds"]["fold-1"]["sensitivity"] == pytest.approx(6 / 10)
    pooled = shown["pooled"]  # a's figures on p0, b's on p1-p3; detection from the summed counts
    assert pooled["patient_dice"] == pytest.approx({"p0": 0.2, "p1": 0.7, "p2": 0.7, "p3": 0.85})
    assert pooled["detection"]["sensitivity"] == pytest.approx(15 / 25)
    assert pooled["detection"]["specificity"] == pytest.approx(24 / 30)
    assert shown["sum"] == pytest.approx(0.6125 + 0.6 + 0.8)


def test_the_preview_command_compares_with_a_recorded_cross_validation(tmp_path):
    grids, records = tmp_path / "cv", tmp_path / "records"
    for name, grid in GRIDS.items():
        _trained_round(grids / name, grid)
    for name, dice, detection in (("fold-0", {"q0": 0.5}, (5, 1, 5, 9)), ("fold-1", {"q1": 0.7}, (5, 1, 5, 9))):
        metrics = _candidate("x", dice, detection)["metrics"]
        (records / name / "test-exported").mkdir(parents=True)
        (records / name / "test-score.json").write_text(json.dumps({"metrics": metrics}))
        (records / name / "test-exported" / "report.json").write_text(json.dumps({"models": [{"metrics": metrics}]}))
    assert reference_choice.recorded_sum(records) == pytest.approx(0.6 + 10 / 20 + 18 / 20)
    run = [sys.executable, str(JOBS / "reference_choice.py"), "preview", str(grids), str(records)]
    done = subprocess.run(run, capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("fold-0: a ") and "Dice 0.2000, sensitivity 0.2000, specificity 0.5000" in lines[0]
    assert lines[-1] == (f"pooled over 4 patients of 3 round(s): Dice 0.6125 (median 0.7000), sensitivity 0.6000, "
                         f"specificity 0.8000: sum 2.0125 against 2.0000 of {records}: beats it")
    empty = subprocess.run([*run[:-1], str(tmp_path / "none")], capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.strip() == f"reference_choice: no fold-*/test-score.json under {tmp_path / 'none'}"
