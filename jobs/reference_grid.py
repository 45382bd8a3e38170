"""Scores every candidate setting of a jobs/reference_model.sh build on its test patients, for the
pooled choice of jobs/reference_cv.sh (CHOICE=pooled): each round's grid is the out-of-fold
evidence the other rounds choose on (jobs/reference_choice.py `pooled`).

The candidates are every combination of the training stage, flip TTA, a one-slice step, the
threshold and a per-patient 3-D step (the constants below). One forward pass per stage and TTA setting
gives the probabilities; each candidate's masks are the Segmenter's post-processing of them, so a
candidate's figures are what `brainseg evaluate` gives at the same settings. Writes WORK/grid.json:
the patients, the SHA-256 of each stage's weights it scored (a retrained round's grid is stale:
jobs/reference_choice.py `ready`), then per candidate its settings and its metrics (`brainseg
evaluate`'s keys).

    python jobs/reference_grid.py WORK --data DATASET [--split test]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

STAGES = ("stage1", "stage2")
TTA = (False, True)
PLANE = {"none": {}, "peak90": {"min_component_peak": 0.9}, "px64": {"min_component_px": 64}}
THRESHOLDS = (0.5, 0.4, 0.3, 0.2)
VOLUME = {"none": {}, "largest": {"largest_component_3d": True},
          "fifth": {"largest_component_3d": True, "keep_3d_fraction": 0.2}}
OFF = {"min_component_px": 0, "min_component_peak": 0.0, "largest_component_3d": False, "keep_3d_fraction": 1.0}


def candidates() -> list[dict]:
    """Every candidate, in the order of the constants above: the simplest first (ties go to the earlier one)."""
    rows = []
    for stage, tta, plane, threshold, volume in itertools.product(STAGES, TTA, PLANE, THRESHOLDS, VOLUME):
        name = f"{stage} {'tta-' if tta else ''}{plane} {threshold:g} 3d-{volume}"
        rows.append({"name": name, "stage": stage, "threshold": threshold,
                     "postprocess": {**OFF, **PLANE[plane], **VOLUME[volume], "tta": tta}})
    return rows


def read_patients(data: str, split_file: Path, split: str):
    """The labelled slices of SPLIT's patients: ids, slice indices, images, masks (slice order)."""
    from brainseg_ray.data import schema
    from brainseg_ray.data.split import read_split_file
    from brainseg_ray.data.tables import decode_tensor, keep_labelled_patients, read_slices_table

    if not split_file.is_file():
        raise ValueError(f"{split_file}: no split file (the build's `brainseg split` writes it)")
    patients = read_split_file(str(split_file)).in_split(split)
    if not patients:
        raise ValueError(f"{split_file}: no patients in split {split!r}")
    try:
        table = read_slices_table(data, columns=["patient_id", "slice_index", "image", "mask", "labelled"])
    except FileNotFoundError:
        raise ValueError(f"{data}: not an ingested dataset (no slices/ folder)") from None
    table = keep_labelled_patients(table, patients)
    missing = sorted(set(patients) - set(table.column("patient_id").to_pylist()))
    if missing:
        raise ValueError(f"{split_file}: {len(missing)} patients have no labelled slices in {data}, e.g. {missing[0]}")
    return (patients, table.column("patient_id").to_pylist(), table.column("slice_index").to_pylist(),
            decode_tensor(table.column("image"), schema.IMAGE_SHAPE),
            decode_tensor(table.column("mask"), schema.MASK_SHAPE).astype(bool))


def grid(work: Path, data: str, split: str = "test", batch: int = 32) -> dict:
    from brainseg_ray.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from brainseg_ray.config import SegmenterConfig
    from brainseg_ray.inference.postprocess import PostprocessOptions, postprocess
    from brainseg_ray.inference.segmenter import Segmenter
    from brainseg_ray.train.metrics import SegmentationMetrics, slice_counts

    patients, ids, slices, images, truth = read_patients(data, work / "split.json", split)
    models = {stage: work / stage / "model" for stage in STAGES}
    missing = [str(m) for m in models.values() if not (m / "model.json").is_file()]
    if missing:
        raise ValueError(f"{missing[0]}: no trained model (the build's train stages write it)")
    rows = candidates()
    probabilities = {}
    for stage, tta in itertools.product(STAGES, TTA):  # the forward passes, once each
        segmenter = Segmenter(SegmenterConfig(model=str(models[stage]), tta=tta, precision="fp32"))
        probabilities[stage, tta] = np.concatenate(
            [segmenter.probabilities(images[i:i + batch]) for i in range(0, len(images), batch)])
    for row in rows:
        options = PostprocessOptions(threshold=row["threshold"],
                                     **{k: v for k, v in row["postprocess"].items() if k != "tta"})
        masks = postprocess(probabilities[row["stage"], row["postprocess"]["tta"]], options, ids, slices)
        metrics = SegmentationMetrics()
        metrics.update_counts(ids, *slice_counts(masks.astype(bool), truth))
        row["metrics"] = metrics.compute()
    scored = {stage: json.loads((m / "model.json").read_text())["weights_sha256"] for stage, m in models.items()}
    return {"split": split, "patients": patients, "num_slices": len(ids), "models": scored, "candidates": rows}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    try:
        result = grid(args.work, args.data, args.split)
    except ValueError as e:
        print(f"reference_grid: {e}", file=sys.stderr)
        return 2
    (args.work / "grid.json").write_text(json.dumps(result))
    print(f"grid: {len(result['candidates'])} candidates on {len(result['patients'])} patients "
          f"({result['num_slices']} slices) -> {args.work / 'grid.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
