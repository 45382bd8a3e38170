"""Pools the test scores of jobs/reference_cv.sh's rounds (WORK/fold-*/test-score.json, each from
`brainseg score`) into WORK/cv-score.json: every patient's Dice once, the mean and median over all
of them, and detection and pixel figures from the summed counts.

    python jobs/reference_cv.py WORK
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def pool(scores: dict[str, dict]) -> dict:
    """{round name: a `brainseg score` JSON} -> the pooled figures. A patient scored in two
    rounds means the rounds' test splits overlap: refused."""
    dice: dict[str, float] = {}
    detection = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    pixel = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for name, score in sorted(scores.items()):
        metrics = score["metrics"]
        twice = sorted(set(dice) & set(metrics["patient_dice"]))
        if twice:
            raise ValueError(f"{name}: patients already scored in another round: {', '.join(twice)}")
        dice.update(metrics["patient_dice"])
        for counts, key in ((detection, "detection"), (pixel, "pixel")):
            for c in counts:
                counts[c] += metrics[key][c]

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "rounds": sorted(scores),
        "num_patients": len(dice),
        "patient_dice_mean": statistics.fmean(dice.values()) if dice else None,
        "patient_dice_median": statistics.median(dice.values()) if dice else None,
        "patients_under_0.5": sorted(p for p, d in dice.items() if d < 0.5),
        "detection": {**detection, "sensitivity": ratio(detection["tp"], detection["tp"] + detection["fn"]),
                      "specificity": ratio(detection["tn"], detection["tn"] + detection["fp"])},
        "pixel": {**pixel, "precision": ratio(pixel["tp"], pixel["tp"] + pixel["fp"]),
                  "recall": ratio(pixel["tp"], pixel["tp"] + pixel["fn"]),
                  "dice": ratio(2 * pixel["tp"], 2 * pixel["tp"] + pixel["fp"] + pixel["fn"])},
        "patient_dice": dict(sorted(dice.items())),
    }


def main(work: Path) -> int:
    scores = {p.parent.name: json.loads(p.read_text()) for p in sorted(work.glob("fold-*/test-score.json"))}
    if not scores:
        print(f"reference_cv: no fold-*/test-score.json under {work}", file=sys.stderr)
        return 2
    pooled = pool(scores)
    (work / "cv-score.json").write_text(json.dumps(pooled, indent=1))
    d = pooled["detection"]
    print(f"cross-validation: {len(scores)} round(s), {pooled['num_patients']} patients: mean patient Dice "
          f"{pooled['patient_dice_mean']:.4f} (median {pooled['patient_dice_median']:.4f}), detection sensitivity "
          f"{d['sensitivity']:.4f}, specificity {d['specificity']:.4f} -> {work / 'cv-score.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/reference-cv")))
