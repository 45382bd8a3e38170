"""Pools the test figures of jobs/reference_cv.sh's rounds (WORK/fold-*) into WORK/cv-score.json:
every patient's Dice once, the mean and median over all of them, detection and pixel figures from
the summed counts, each from the bulk job's mask files (`brainseg score`: test-score.json) and from
`brainseg evaluate` (test-exported/report.json), how far the two differ, and the web page check's
counts (web-check.json) where it ran.

    python jobs/reference_cv.py WORK
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COUNTS = ("tp", "fp", "fn", "tn")
WEB = ("tumour_free", "tumour_free_said_present", "tumour", "tumour_said_present")


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def pool(rounds: dict[str, dict]) -> dict:
    """{round name: metrics of `brainseg score` or `brainseg evaluate`} -> the pooled figures, in the
    same keys. Slice Dice is a mean over tumour slices, so rounds weigh by their tumour slices. A
    patient in two rounds means the rounds' test splits overlap: refused."""
    dice: dict[str, float] = {}
    detection, pixel = dict.fromkeys(COUNTS, 0), dict.fromkeys(COUNTS, 0)
    slices = tumour_slices = 0
    slice_dice_sum = 0.0
    for name, metrics in sorted(rounds.items()):
        twice = sorted(set(dice) & set(metrics["patient_dice"]))
        if twice:
            raise ValueError(f"{name}: patients already scored in another round: {', '.join(twice)}")
        dice.update(metrics["patient_dice"])
        for counts, key in ((detection, "detection"), (pixel, "pixel")):
            for c in COUNTS:
                counts[c] += metrics[key][c]
        slices += metrics["num_slices"]
        tumour_slices += metrics["num_tumour_slices"]
        slice_dice_sum += (metrics["slice_dice_mean"] or 0.0) * metrics["num_tumour_slices"]
    return {
        "rounds": sorted(rounds),
        "num_patients": len(dice),
        "num_slices": slices,
        "num_tumour_slices": tumour_slices,
        "patient_dice_mean": statistics.fmean(dice.values()) if dice else None,
        "patient_dice_median": statistics.median(dice.values()) if dice else None,
        "slice_dice_mean": slice_dice_sum / tumour_slices if tumour_slices else None,
        "patients_under_0.5": sorted(p for p, d in dice.items() if d < 0.5),
        "detection": {**detection, "sensitivity": _ratio(detection["tp"], detection["tp"] + detection["fn"]),
                      "specificity": _ratio(detection["tn"], detection["tn"] + detection["fp"])},
        "pixel": {**pixel, "precision": _ratio(pixel["tp"], pixel["tp"] + pixel["fp"]),
                  "recall": _ratio(pixel["tp"], pixel["tp"] + pixel["fn"]),
                  "dice": _ratio(2 * pixel["tp"], 2 * pixel["tp"] + pixel["fp"] + pixel["fn"])},
        "patient_dice": dict(sorted(dice.items())),
    }


def pool_web(checks: dict[str, dict]) -> dict | None:
    """{round name: jobs/reference_web_check.py's JSON} -> the summed counts and shares; None if none ran."""
    if not checks:
        return None
    counts = {k: sum(c[k] for c in checks.values()) for k in WEB}
    return {"rounds": sorted(checks), **counts,
            "tumour_free_said_absent_share": _ratio(counts["tumour_free"] - counts["tumour_free_said_present"],
                                                    counts["tumour_free"]),
            "tumour_said_present_share": _ratio(counts["tumour_said_present"], counts["tumour"]),
            "tumour_free_files_said_present": sorted(f for c in checks.values()
                                                     for f in c["tumour_free_files_said_present"])}


def pool_rounds(folders: list[Path]) -> dict:
    """The test figures of build folders of jobs/reference_model.sh (each scored its own test
    patients), pooled: what the card and cv-score.json report."""
    segment = {f.name: json.loads((f / "test-score.json").read_text())["metrics"] for f in folders}
    evaluate = {f.name: json.loads((f / "test-exported" / "report.json").read_text())["models"][0]["metrics"]
                for f in folders}
    web = {f.name: json.loads((f / "web-check.json").read_text()) for f in folders if (f / "web-check.json").exists()}
    pooled = {"segment": pool(segment), "evaluate": pool(evaluate), "web": pool_web(web)}
    seg, ev = pooled["segment"]["patient_dice"], pooled["evaluate"]["patient_dice"]
    if sorted(seg) != sorted(ev):
        raise ValueError(f"the mask files and evaluate scored different patients: {sorted(set(seg) ^ set(ev))}")
    pooled["largest_dice_difference"] = max((abs(seg[p] - ev[p]) for p in seg), default=None)
    return pooled


def main(work: Path) -> int:
    folders = sorted(p.parent for p in work.glob("fold-*/test-score.json"))
    if not folders:
        print(f"reference_cv: no fold-*/test-score.json under {work}", file=sys.stderr)
        return 2
    pooled = pool_rounds(folders)
    (work / "cv-score.json").write_text(json.dumps(pooled, indent=1))
    s, web = pooled["segment"], pooled["web"]
    d = s["detection"]
    print(f"cross-validation: {len(folders)} round(s), {s['num_patients']} patients: mean patient Dice "
          f"{s['patient_dice_mean']:.4f} (median {s['patient_dice_median']:.4f}), detection sensitivity "
          f"{d['sensitivity']:.4f}, specificity {d['specificity']:.4f}; evaluate's mean "
          f"{pooled['evaluate']['patient_dice_mean']:.4f} (largest patient difference "
          f"{pooled['largest_dice_difference']:.4f})" + (
              f"; web page: {web['tumour_free'] - web['tumour_free_said_present']} of {web['tumour_free']} "
              f"tumour-free slices shown as no tumour" if web else "") + f" -> {work / 'cv-score.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/reference-cv")))
