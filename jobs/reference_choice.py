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
Another round's grid counts whether or not its models are still on disk; a round's own grid must
be of its own models before the round is exported (`ready`).
Five validation patients decided four different ways in five rounds; forty decide once per round,
and sensitivity, the figure the acceptance found furthest short, counts as much as specificity.

    python jobs/reference_choice.py best WORK NAME...   # the chosen of WORK/choice/NAME/report.json
    python jobs/reference_choice.py threshold REPORT    # the chosen cut of REPORT's own and its sweep's
    python jobs/reference_choice.py pooled CV ROUND OUT # ROUND's (fold-K, or final) pooled choice, as JSON
    python jobs/reference_choice.py ready ROUND         # exit 0 if ROUND's grid is of its models, else 1 and why
    python jobs/reference_choice.py preview CV SHIPPED  # the pooled recipe's CV figures from its grids alone,
                                                        # against SHIPPED's recorded rounds (docs/reference-cv/MODEL)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (the tests, the card)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_cv import pool, pool_rounds  # noqa: E402  (beside this script)

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
            "num_patients": sum(len(g["patients"]) for g in others.values()), "candidates": len(ranked),
            # provenance: the weights each grid scored (None for a grid older than that record)
            "grid_models": {name: g.get("models") for name, g in others.items()}}


def preview(grids: dict[str, dict]) -> dict:
    """Each round's pooled choice with the figures its own grid gives that candidate on its own test
    patients, and those pooled: the cross-validation figures of CHOICE=pooled before any round is
    exported (a grid's candidate scores as `brainseg evaluate` does at its settings)."""
    rounds, own = {}, {}
    for name, grid in sorted(grids.items()):
        chosen = choose_pooled(grids, name)
        own[name] = next(c for c in grid["candidates"] if c["name"] == chosen["name"])["metrics"]
        alone = pool({name: own[name]})
        rounds[name] = {"name": chosen["name"], "patient_dice_mean": alone["patient_dice_mean"],
                        "sensitivity": alone["detection"]["sensitivity"],
                        "specificity": alone["detection"]["specificity"]}
    pooled = pool(own)
    return {"rounds": rounds, "pooled": pooled, "sum": recipe_sum(pooled)}


def recipe_sum(pooled: dict) -> float:
    """Pooled patient Dice + detection sensitivity + specificity: what the pooled recipe must beat the
    shipped one by to replace it (docs/training.md, fixed before its figures). The pooled rule's
    score without the TTA cost: the shipped figures carry none."""
    return pooled_score(pooled, tta=False)


def recorded_sum(records: Path) -> float:
    """`recipe_sum` of a recorded cross-validation's rounds, from the bulk job's mask files, as its
    cv-score.json and card pool them (jobs/reference_cv.py)."""
    folders = sorted(p.parent for p in Path(records).glob("fold-*/test-score.json"))
    if not folders:
        raise ValueError(f"no fold-*/test-score.json under {records}")
    return recipe_sum(pool_rounds(folders)["segment"])


def grid_state(round_dir: Path) -> str | None:
    """None if the round's grid.json is of the round's own models: the round is exported (its choice
    made and scored, e.g. restored from its record), or the grid scored the stage models now on
    disk. Else why not: the round must train (and its grid be scored) again before it is exported,
    so that its grid, which the final model chooses on, is of the models it exported (CPU training
    is not bit-reproducible)."""
    round_dir = Path(round_dir)
    if not (round_dir / "grid.json").is_file():
        return "no grid.json"
    if (round_dir / "test-exported" / "report.json").is_file():
        return None
    scored = json.loads((round_dir / "grid.json").read_text()).get("models")
    if not scored:
        return "its grid.json does not name the models it scored"
    for stage, sha in sorted(scored.items()):
        artifact = round_dir / stage / "model" / "model.json"
        if not artifact.is_file():
            return f"{stage}'s model, which its grid scored, is not here"
        if json.loads(artifact.read_text()).get("weights_sha256") != sha:
            return f"{stage}'s model is not the one its grid scored"
    return None


def read_grids(cv: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(cv).glob("fold-*/grid.json"))}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "best":
        print(best(Path(argv[1]), argv[2:]))
    elif len(argv) == 2 and argv[0] == "threshold":
        print("%g" % best_threshold(json.loads(Path(argv[1]).read_text())["models"][0]))
    elif len(argv) == 2 and argv[0] == "ready":
        why = grid_state(Path(argv[1]))
        if why:
            print(why)
            return 1
    elif len(argv) == 4 and argv[0] == "pooled":
        # The other rounds' grids are evidence about the candidates on patients this round never
        # tests on, so they count whether or not the models they scored are still on disk: a round
        # can finish in the session that trains it (CPU sessions do not keep their models).
        chosen = choose_pooled(read_grids(Path(argv[1])), argv[2])
        Path(argv[3]).write_text(json.dumps(chosen, indent=1))
        print(f"{argv[2]}: {chosen['name']} (score {chosen['score']:.4f} on {chosen['num_patients']} patients of "
              f"{', '.join(chosen['chosen_on'])})")
    elif len(argv) == 3 and argv[0] == "preview":
        grids = read_grids(Path(argv[1]))
        if not grids:
            raise ValueError(f"no fold-*/grid.json under {argv[1]}")
        shown, bar = preview(grids), recorded_sum(Path(argv[2]))
        for name, r in shown["rounds"].items():
            print(f"{name}: {r['name']:<30} own test patients: Dice {r['patient_dice_mean']:.4f}, "
                  f"sensitivity {r['sensitivity']:.4f}, specificity {r['specificity']:.4f}")
        p = shown["pooled"]
        print(f"pooled over {p['num_patients']} patients of {len(shown['rounds'])} round(s): Dice "
              f"{p['patient_dice_mean']:.4f} (median {p['patient_dice_median']:.4f}), sensitivity "
              f"{p['detection']['sensitivity']:.4f}, specificity {p['detection']['specificity']:.4f}: sum "
              f"{shown['sum']:.4f} against {bar:.4f} of {argv[2]}: " + ("beats it" if shown["sum"] > bar else "does not beat it"))
    else:
        print("usage:\n" + "\n".join(__doc__.strip().splitlines()[-6:]), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ValueError as e:  # a bad folder or grid: one line, not a traceback
        print(f"reference_choice: {e}", file=sys.stderr)
        sys.exit(2)
