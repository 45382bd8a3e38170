"""`brainseg demo`: the whole story on the embedded default, with nothing but the repository.

Synthetic patients in the kaggle_3m layout -> Ray Data ingest -> patient-level split -> a short Ray
Train run -> evaluation on the held-out test patients -> bulk segmentation of every slice -> a
summary table of what was made, how well and how fast, and where it is.
"""

from __future__ import annotations

import json
import os
import time

from brainseg_ray.config import (
    EvaluateConfig,
    IngestConfig,
    RayConfig,
    SegmenterConfig,
    SegmentJobConfig,
    TrainConfig,
)
from brainseg_ray.data.synthetic import write_synthetic_dataset
from brainseg_ray.runtime import init_ray

# A small plain U-Net at 128 px learns the synthetic lesions in a few epochs on two CPU cores
# (the suite's learning test trains the same and asserts Dice >= 0.8 on held-out patients).
DEMO_TRAINING = dict(model="unet", base_filters=8, image_size=128, batch_size=8, lr=3e-3, epochs=8)


def run_demo(out: str = "demo-out", patients: int = 12, seed: int = 0, ray: RayConfig | None = None,
             log=print) -> dict:
    from brainseg_ray.batch import segment
    from brainseg_ray.data.ingest import ingest
    from brainseg_ray.data.split import assign_splits
    from brainseg_ray.data.tables import tumour_slices_by_patient
    from brainseg_ray.evaluate.run import evaluate
    from brainseg_ray.train.trainer import train

    started = time.time()
    timings: dict[str, float] = {}

    def step(name: str, since: float) -> float:
        now = time.time()
        timings[name] = round(now - since, 1)
        log(f"demo: {name} done in {timings[name]} s")
        return now

    synth = write_synthetic_dataset(os.path.join(out, "synthetic"), patients=patients, seed=seed)
    init_ray(ray or RayConfig())
    t = step("synthetic data", started)

    ingested = ingest(IngestConfig(source=synth.root, out=os.path.join(out, "dataset")))
    splits = assign_splits(tumour_slices_by_patient(ingested.out), (0.67, 0.165, 0.165), seed=seed)
    split_file = os.path.join(out, "split.json")
    with open(split_file, "w") as f:
        json.dump({"splits": splits}, f, indent=1, sort_keys=True)
    per_split = {name: sum(1 for s in splits.values() if s == name) for name in ("train", "val", "test")}
    t = step("ingest and split", t)

    trained = train(TrainConfig(data=ingested.out, out=os.path.join(out, "run"), split_file=split_file,
                                ray=ray or RayConfig(), **DEMO_TRAINING))
    t = step("training", t)

    evaluated = evaluate(EvaluateConfig(models=[trained.model_uri], data=ingested.out, out=os.path.join(out, "report"),
                                        split_file=split_file, split="test"))
    test_metrics = evaluated.report["models"][0]["metrics"]
    t = step("evaluation", t)

    segment_started = time.time()
    segmented = segment(SegmentJobConfig(input=synth.root, output=os.path.join(out, "segmentation"),
                                         segmenter=SegmenterConfig(model=trained.model_uri)))
    segment_seconds = time.time() - segment_started
    t = step("bulk segmentation", t)

    return {
        "synthetic patients": synth.patients,
        "slice files found / ingested / errors": f"{ingested.found} / {ingested.written} / {ingested.errors}",
        "patients train/val/test": "/".join(str(n) for n in per_split.values()),
        "training": f"{trained.epochs_run} epochs of {DEMO_TRAINING['model']} at {DEMO_TRAINING['image_size']} px, "
                    f"best validation Dice {trained.best_val_patient_dice:.3f} (epoch {trained.best_epoch})",
        "test patients' Dice (held out)": f"{test_metrics['patient_dice_mean']:.3f} "
                                          f"(sensitivity {test_metrics['detection']['sensitivity']:.3f})",
        "segmented / errors": f"{segmented.ok} / {segmented.errors} of {segmented.found} "
                              f"({segmented.found / segment_seconds:.1f} slices/s)",
        "dataset": ingested.out,
        "model": trained.model_uri,
        "training curves": os.path.join(trained.out, "curves.png"),
        "evaluation report": os.path.join(evaluated.out, "report.md"),
        "masks and overlays": os.path.join(out, "segmentation"),
        "step seconds": ", ".join(f"{k} {v}" for k, v in timings.items()),
        "seconds": round(time.time() - started, 1),
    }


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    print("brainseg demo summary")
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")
