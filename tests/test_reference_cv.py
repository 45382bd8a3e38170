"""jobs/reference_cv.py: the rounds of a cross-validation pooled into one set of figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "reference_cv.py"
spec = importlib.util.spec_from_file_location("reference_cv", SCRIPT)
reference_cv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference_cv)


def _score(dice: dict[str, float], detection: tuple[int, int, int, int], pixel: tuple[int, int, int, int]) -> dict:
    """A `brainseg score` JSON with just the fields the pooling reads."""
    return {"metrics": {"patient_dice": dice, "detection": dict(zip(("tp", "fp", "fn", "tn"), detection)),
                        "pixel": dict(zip(("tp", "fp", "fn", "tn"), pixel))}}


def test_rounds_pool_into_every_patient_once_and_summed_counts(tmp_path):
    (tmp_path / "fold-0").mkdir()
    (tmp_path / "fold-1").mkdir()
    (tmp_path / "fold-0" / "test-score.json").write_text(json.dumps(_score({"a": 0.9, "b": 0.0}, (8, 1, 2, 9),
                                                                           (90, 10, 30, 1000))))
    (tmp_path / "fold-1" / "test-score.json").write_text(json.dumps(_score({"c": 0.6}, (2, 1, 0, 10), (10, 0, 10, 500))))
    assert reference_cv.main(tmp_path) == 0
    pooled = json.loads((tmp_path / "cv-score.json").read_text())
    assert pooled["rounds"] == ["fold-0", "fold-1"] and pooled["num_patients"] == 3
    assert pooled["patient_dice_mean"] == pytest.approx(0.5) and pooled["patient_dice_median"] == pytest.approx(0.6)
    assert pooled["patients_under_0.5"] == ["b"]
    assert pooled["detection"]["sensitivity"] == pytest.approx(10 / 12)  # (8 + 2) / (8 + 2 + 2 + 0)
    assert pooled["detection"]["specificity"] == pytest.approx(19 / 21)
    assert pooled["pixel"]["precision"] == pytest.approx(100 / 110) and pooled["pixel"]["recall"] == pytest.approx(100 / 140)


def test_a_patient_in_two_rounds_is_refused():
    with pytest.raises(ValueError, match="fold-1: patients already scored in another round: a"):
        reference_cv.pool({"fold-0": _score({"a": 0.9}, (1, 0, 0, 1), (1, 0, 0, 1)),
                           "fold-1": _score({"a": 0.8}, (1, 0, 0, 1), (1, 0, 0, 1))})


def test_no_rounds_is_one_line_and_exit_2(tmp_path, capsys):
    assert reference_cv.main(tmp_path) == 2
    assert "no fold-*/test-score.json" in capsys.readouterr().err
