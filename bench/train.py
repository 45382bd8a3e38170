"""Training throughput: the Ray Train loop with one worker against a plain PyTorch loop.

    .venv/bin/python bench/train.py [--data DATASET] [--model unet-resnet18] [--image-size 128]
                                    [--batch-size 8] [--epochs 2] [--repeats 2]

DATASET is an ingested dataset; without it, synthetic patients are written and ingested first.

(a) `train()` with 1 worker holding every CPU: Ray Data shard iteration, decoding, the train step,
    checkpoint per epoch. Its figure is the last epoch's training samples/s as the job reports it
    (the first epoch carries start-up: model build, first iteration of the shard).
(b) the loop a user would write without Ray: the same training slices decoded into memory once,
    the same TrainStep (model, loss, optimiser, precision, batch, threads), timed over the same
    number of steps after a warm-up epoch.

Augmentation is off on both sides (it is the same per-sample code on both; the comparison is of
the loops). The sides take turns --repeats times; medians count. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def _dataset(args, workdir: str) -> str:
    if args.data:
        return args.data
    from brainseg_ray.config import IngestConfig
    from brainseg_ray.data.ingest import ingest
    from brainseg_ray.data.synthetic import write_synthetic_dataset

    synth = write_synthetic_dataset(os.path.join(workdir, "synth"), patients=args.patients, seed=5)
    return ingest(IngestConfig(source=synth.root, out=os.path.join(workdir, "dataset"))).out


def _train_config(args, data: str, out: str):
    from brainseg_ray.config import TrainConfig

    return TrainConfig(data=data, out=out, model=args.model, image_size=args.image_size, batch_size=args.batch_size,
                       epochs=args.epochs, augmentation="none", val_fraction=args.val_fraction, num_workers=1,
                       precision=args.precision, resume=False, early_stopping_patience=0)


def ray_side(args, data: str, workdir: str, run: int) -> tuple[float, int]:
    from brainseg_ray.train.trainer import train

    result = train(_train_config(args, data, os.path.join(workdir, f"ray-run-{run}")))
    last = result.history[-1]
    return last["train_samples_per_s"], last["train_samples"]


def plain_side(args, data: str, steps: int) -> float:
    import torch

    from brainseg_ray.data import schema
    from brainseg_ray.data.tables import decode_tensor, read_slices_table, tumour_slices_by_patient
    from brainseg_ray.devices import pick_device, resolve_precision
    from brainseg_ray.models.inputs import images_to_tensor, masks_to_tensor, normalisation_from_profile
    from brainseg_ray.models.registry import ModelSpec, build_model
    from brainseg_ray.train.losses import build_loss
    from brainseg_ray.train.steps import TrainStep, build_one_cycle, build_optimizer
    from brainseg_ray.train.trainer import choose_patients, read_manifest

    cfg = _train_config(args, data, "")
    torch.set_num_threads(os.cpu_count() or 1)
    train_patients, _, _ = choose_patients(cfg, tumour_slices_by_patient(data))
    table = read_slices_table(data, columns=["patient_id", "image", "mask", "labelled"],
                              filters=[("patient_id", "in", train_patients), ("labelled", "=", True)])
    images = np.array(decode_tensor(table.column("image"), schema.IMAGE_SHAPE))
    masks = np.array(decode_tensor(table.column("mask"), schema.MASK_SHAPE))
    normalisation = normalisation_from_profile(read_manifest(data, cfg.s3).get("profile"))
    device = pick_device(False)
    precision = resolve_precision(cfg.precision, device)
    model = build_model(ModelSpec(cfg.model)).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    step = TrainStep(model, build_loss(cfg.loss), optimizer, device, precision, cfg.grad_clip,
                     build_one_cycle(optimizer, cfg.lr, 2 * steps))
    rng = np.random.default_rng(0)

    def epoch() -> float:
        order = rng.permutation(len(images))
        started = time.perf_counter()
        for k in range(steps):
            idx = np.sort(order[(k * cfg.batch_size) % len(order):][: cfg.batch_size])
            x = images_to_tensor(images[idx], normalisation, cfg.image_size, device, True)
            step(x, masks_to_tensor(masks[idx], cfg.image_size, device))
        return time.perf_counter() - started

    epoch()  # warm-up, as the Ray side's first epoch
    return steps * cfg.batch_size / epoch()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data")
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--model", default="unet-resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from brainseg_ray.compat import ensure_torchvision_importable
    from brainseg_ray.runtime import init_ray

    ensure_torchvision_importable()
    from brainseg_ray.config import RayConfig
    from brainseg_ray.devices import pick_device, resolve_precision

    init_ray(RayConfig())
    with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
        data = _dataset(args, workdir)
        ray_rates, plain_rates, samples = [], [], 0
        for run in range(args.repeats):
            rate, samples = ray_side(args, data, workdir, run)
            ray_rates.append(rate)
            plain_rates.append(plain_side(args, data, samples // args.batch_size))
            print(f"run {run + 1}: ray {rate:.2f} samples/s, plain {plain_rates[-1]:.2f} samples/s", file=sys.stderr)
    ray_rate, plain_rate = statistics.median(ray_rates), statistics.median(plain_rates)
    precision = resolve_precision(args.precision, pick_device(False))
    setup = f"{args.model} {args.image_size}x{args.image_size}, batch {args.batch_size}, {precision}, {os.cpu_count()} CPUs"
    print(f"ray train, 1 worker: {ray_rate:.2f} samples/s ({samples} samples per epoch; {setup})")
    print(f"plain pytorch loop:  {plain_rate:.2f} samples/s (same steps, data in memory)")
    print(f"ratio ray/plain = {ray_rate / plain_rate:.3f}")
    print(json.dumps({"ray_samples_per_s": round(ray_rate, 2), "plain_samples_per_s": round(plain_rate, 2),
                      "ratio": round(ray_rate / plain_rate, 3), "model": args.model, "image_size": args.image_size,
                      "batch_size": args.batch_size, "precision": precision, "samples_per_epoch": samples,
                      "cpus": os.cpu_count(), "gpu": None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
