"""`brainseg demo`: the main job on the embedded default, with nothing but the repository.

Synthetic patients in the kaggle_3m layout -> Ray Data ingest -> patient-level split, then a
summary table of what was made and where it is.
"""

from __future__ import annotations

import os
import time

from brainseg_ray.config import IngestConfig, RayConfig
from brainseg_ray.data.ingest import ingest
from brainseg_ray.data.split import assign_splits
from brainseg_ray.data.synthetic import write_synthetic_dataset
from brainseg_ray.data.tables import tumour_slices_by_patient
from brainseg_ray.runtime import init_ray


def run_demo(out: str = "demo-out", patients: int = 12, seed: int = 0, ray: RayConfig | None = None) -> dict:
    started = time.time()
    synth = write_synthetic_dataset(os.path.join(out, "synthetic"), patients=patients, seed=seed)
    init_ray(ray or RayConfig())
    result = ingest(IngestConfig(source=synth.root, out=os.path.join(out, "dataset")))
    splits = assign_splits(tumour_slices_by_patient(result.out), seed=seed)
    per_split = {name: sum(1 for s in splits.values() if s == name) for name in ("train", "val", "test")}
    summary = {
        "synthetic patients": synth.patients,
        "slice files found": result.found,
        "slices written": result.written,
        "errors": result.errors,
        "tumour slices": result.manifest["profile"]["tumour_slices"],
        "patients train/val/test": "/".join(str(n) for n in per_split.values()),
        "dataset": result.out,
        "profile chart": os.path.join(result.out, "profile.png"),
        "seconds": round(time.time() - started, 1),
    }
    return summary


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    print("brainseg demo summary")
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")
