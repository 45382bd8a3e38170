"""The rule jobs/reference_model.sh chooses by, fixed before any candidate was run.

Of the `brainseg evaluate` reports on the validation patients, the one with the highest patient
Dice + detection specificity wins (Dice alone would keep false-positive slices), less 0.01 for flip
TTA, which triples the cost of every slice; a tie goes to the first named. A threshold is chosen
the same way from one report's sweep (its predictions cut at each of the sweep's thresholds).
The script and the card (jobs/reference_card.py) both call this, so they cannot disagree.

The pooled choice (jobs/reference_cv.sh CHOICE=pooled) chooses instead over the grids of
jobs/reference_grid.py, each round's candidates scored on its own test patients: a round takes the
candidate that ranks first over the other rounds' patients pooled (the final model, over all of
them), by patient Dice + detection sensitivity + detection specificity, less the same TTA cost.
Five validation patients decided four different ways in five rounds; forty decide once per round,
and sensitivity, the figure the acceptance found furthest short, counts as much as specificity.

    python jobs/reference_choice.py best WORK NAME...   # the chosen of WORK/choice/NAME/report.json
    python jobs/reference_choice.py threshold REPORT    # the chosen cut of REPORT's own and its sweep's
    python jobs/reference_choice.py pooled CV ROUND OUT # ROUND's (fold-K, or final) pooled choice, as JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (the tests, the card)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_cv import pool  # noqa: E402  (beside this script)

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


def pooled_score(metrics: dict, tta: bool) -> float:
    d = metrics["detection"]
    return metrics["patient_dice_mean"] + d["sensitivity"] + d["specificity"] - TTA_COST * bool(tta)


def rank_pooled(grids: dict[str, dict], round_name: str) -> tuple[list[dict], dict[str, dict]]:
    """{round: its grid.json} -> every candidate with its figures pooled over the other rounds'
    patients (all of them for a round not among the grids, e.g. the final model), best first by
    `pooled_score` (a tie: grid order), and those other rounds' grids."""
    others = {name: g for name, g in sorted(grids.items()) if name != round_name}
    if not others:
        raise ValueError(f"no grids besides {round_name}'s to choose on")
    names = [[c["name"] for c in g["candidates"]] for g in others.values()]
    if any(n != names[0] for n in names):
        raise ValueError("the rounds' grids hold different candidates: " + ", ".join(others))
    rows = []
    for i, name in enumerate(names[0]):
        pooled = pool({r: g["candidates"][i]["metrics"] for r, g in others.items()})
        first = next(iter(others.values()))["candidates"][i]
        rows.append({**{k: first[k] for k in ("name", "stage", "threshold", "postprocess")},
                     "score": pooled_score(pooled, first["postprocess"]["tta"]),
                     "patient_dice_mean": pooled["patient_dice_mean"],
                     "sensitivity": pooled["detection"]["sensitivity"],
                     "specificity": pooled["detection"]["specificity"]})
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["score"], i))
    return [rows[i] for i in order], others


def choose_pooled(grids: dict[str, dict], round_name: str) -> dict:
    """The candidate ROUND takes (the first of `rank_pooled`), with its pooled figures and the
    rounds they came from."""
    ranked, others = rank_pooled(grids, round_name)
    chosen = ranked[0]
    return {**chosen, "round": round_name, "chosen_on": sorted(others),
            "num_patients": sum(len(g["patients"]) for g in others.values()), "candidates": len(ranked)}


def read_grids(cv: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(cv).glob("fold-*/grid.json"))}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "best":
        print(best(Path(argv[1]), argv[2:]))
    elif len(argv) == 2 and argv[0] == "threshold":
        print("%g" % best_threshold(json.loads(Path(argv[1]).read_text())["models"][0]))
    elif len(argv) == 4 and argv[0] == "pooled":
        chosen = choose_pooled(read_grids(Path(argv[1])), argv[2])
        Path(argv[3]).write_text(json.dumps(chosen, indent=1))
        print(f"{argv[2]}: {chosen['name']} (score {chosen['score']:.4f} on {chosen['num_patients']} patients of "
              f"{', '.join(chosen['chosen_on'])})")
    else:
        print("usage:\n" + "\n".join(__doc__.strip().splitlines()[-3:]), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
