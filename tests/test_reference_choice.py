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


def test_the_pooled_command_writes_the_choice_the_rebuild_script_reads(tmp_path):
    for name, grid in GRIDS.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "grid.json").write_text(json.dumps(grid))
    out = tmp_path / "fold-0" / "chosen.json"
    done = subprocess.run([sys.executable, str(JOBS / "reference_choice.py"), "pooled", str(tmp_path), "fold-0",
                           str(out)], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("fold-0: a (score ") and "on 3 patients of fold-1, fold-2" in done.stdout
    chosen = json.loads(out.read_text())
    assert chosen == reference_choice.choose_pooled(GRIDS, "fold-0")
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
