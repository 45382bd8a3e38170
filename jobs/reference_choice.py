"""The rule jobs/reference_model.sh chooses by, fixed before any candidate was run.

Of the `brainseg evaluate` reports on the validation patients, the one with the highest patient
Dice + detection specificity wins (Dice alone would keep false-positive slices), less 0.01 for flip
TTA, which triples the cost of every slice; a tie goes to the first named. A threshold is chosen
the same way from one report's sweep (its predictions cut at each of the sweep's thresholds).
The script and the card (jobs/reference_card.py) both call this, so they cannot disagree.

    python jobs/reference_choice.py best WORK NAME...   # the chosen of WORK/choice/NAME/report.json
    python jobs/reference_choice.py threshold REPORT    # the chosen cut of REPORT's own and its sweep's
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TTA_COST = 0.01  # what flip TTA must gain to be worth three forward passes a slice


def score(patient_dice: float, specificity: float, tta: bool = False) -> float:
    return patient_dice + specificity - TTA_COST * bool(tta)


def report_model(work: Path, name: str) -> dict:
    """The one model entry of WORK/choice/NAME/report.json."""
    return json.loads((Path(work) / "choice" / name / "report.json").read_text())["models"][0]


def model_score(model: dict) -> float:
    m = model["metrics"]
    return score(m["patient_dice_mean"], m["detection"]["specificity"], model["postprocess"]["tta"])


def best(work: Path, names: list[str]) -> str:
    scores = {name: model_score(report_model(work, name)) for name in names}
    return max(names, key=lambda n: (scores[n], -names.index(n)))


def threshold_rows(model: dict) -> list[dict]:
    """The report's own threshold, then its sweep's, each with what the rule gives it. The TTA cost
    is left out: every row shares the report's post-processing."""
    m = model["metrics"]
    rows = [{"threshold": model["threshold"], "patient_dice_mean": m["patient_dice_mean"],
             "sensitivity": m["detection"]["sensitivity"], "specificity": m["detection"]["specificity"]},
            *model.get("sweep", [])]
    return [{**r, "score": score(r["patient_dice_mean"], r["specificity"])} for r in rows]


def best_threshold(model: dict) -> float:
    rows = threshold_rows(model)
    return max(rows, key=lambda r: (r["score"], -rows.index(r)))["threshold"]


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "best":
        print(best(Path(argv[1]), argv[2:]))
    elif len(argv) == 2 and argv[0] == "threshold":
        print("%g" % best_threshold(json.loads(Path(argv[1]).read_text())["models"][0]))
    else:
        print("usage:\n" + "\n".join(__doc__.strip().splitlines()[-2:]), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
