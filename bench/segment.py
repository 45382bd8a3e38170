"""Bulk segmentation throughput, all in one run, on the same slices and the same model:

    .venv/bin/python bench/segment.py [--data KAGGLE_3M_DIR] [--model ARTIFACT | --arch unet-efficientnet-lite2]
                                      [--slices 800] [--small 200] [--batch-size N] [--backend auto]

(a) the limit: the model's own forward loop over in-memory tensors, at the job's batch size and
    precision (Predictor.logits on preloaded uint8 slices);
(b) the seed-style loop: open each file with PIL, fp32, batch 1, threshold, write the mask;
(c) the job: `brainseg segment` on a local Ray instance, from the files to the full output.
(c) runs at --small and at --slices slices, for its per-slice cost at both sizes.
(d) the machine's practical limit: a large fp32 matmul on the same CPUs (peak_gflops), against
    which the job's arithmetic rate (job_gflops: slices/s x the model's GFLOP per forward pass x
    passes per slice, 3 with flip TTA) is set as ratio_vs_peak.
A precision check runs the Segmenter in bf16 and in fp32 on --check slices and prints their mask
agreement and speed ratio: what `precision=auto` relies on when it picks bf16 on a CPU with native
bf16 (it keeps fp32 elsewhere, where emulated bf16 is slower).

Without --data the shared LGG data is used (or synthetic slices when it is absent); without
--model a randomly initialised artifact of --arch is written (speed does not depend on weights).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from brainseg_ray.dev_data import SHARED_KAGGLE_3M


def _subset(root: Path, slices: int, into: Path) -> list[Path]:
    """A kaggle_3m folder of whole patients (links) holding at least `slices` slices; its images."""
    into.mkdir(parents=True)
    images: list[Path] = []
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        if len(images) >= slices:
            break
        (into / patient.name).symlink_to(patient.resolve(), target_is_directory=True)
        images += [p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")]
    return images


def _model(args, workdir: str) -> str:
    from common import model_or_untrained  # bench/ is on sys.path when a bench script runs

    return model_or_untrained(args.model, args.arch, workdir)


def limit(model: str, images: list[Path], batch_size: int | None, precision: str,
          backend: str) -> tuple[float, object]:
    import tifffile
    import torch

    from brainseg_ray.inference.predictor import Predictor

    torch.set_num_threads(os.cpu_count() or 1)
    predictor = Predictor.load(model, precision=precision, batch_size=batch_size, backend=backend,
                               threads=os.cpu_count() or 1)
    stack = np.stack([tifffile.imread(p) for p in images])
    predictor.logits(stack[:predictor.batch_size])  # warm-up
    started = time.perf_counter()
    predictor.logits(stack)
    return len(images) / (time.perf_counter() - started), predictor


def model_gflop(model: str) -> float:
    """GFLOP of one forward pass over one slice at the model's input size (a multiply-add is 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from brainseg_ray.models.artifact import load_artifact

    artifact = load_artifact(model)
    size = int(artifact.metadata["input"]["size"])
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        artifact.model(torch.zeros(1, artifact.spec.in_channels, size, size))
    return counter.get_total_flops() / 1e9


def peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The best of `repeats` fp32 n x n matmuls on all CPUs: what these cores sustain in practice."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best / 1e9


def precision_check(model: str, images: list[Path], batch_size: int | None) -> dict:
    """bf16 against fp32 on the same slices: share of mask pixels that agree, and speed."""
    import tifffile
    import torch

    from brainseg_ray.config import SegmenterConfig
    from brainseg_ray.devices import cpu_has_native_bf16
    from brainseg_ray.inference.segmenter import Segmenter

    stack = np.stack([tifffile.imread(p) for p in images])
    masks, rates = {}, {}
    for precision in ("fp32", "bf16"):
        segmenter = Segmenter(SegmenterConfig(model=model, precision=precision, batch_size=batch_size,
                                              threads=torch.get_num_threads(), backend="torch"))
        segmenter.segment(stack[:2])  # warm-up
        started = time.perf_counter()
        masks[precision] = np.stack([r.mask for r in segmenter.segment(stack)])
        rates[precision] = len(stack) / (time.perf_counter() - started)
    return {"bf16_mask_agreement": float((masks["fp32"] == masks["bf16"]).mean()),
            "bf16_vs_fp32_speed": rates["bf16"] / rates["fp32"], "cpu_native_bf16": cpu_has_native_bf16(),
            "check_slices": len(stack)}


def seed_loop(model: str, images: list[Path], out: Path) -> float:
    """What the seeds did: PIL per file, fp32, one slice at a time."""
    import torch
    from PIL import Image

    from brainseg_ray.models.artifact import load_artifact
    from brainseg_ray.models.inputs import images_to_tensor, logits_to_probabilities

    torch.set_num_threads(os.cpu_count() or 1)
    artifact = load_artifact(model)
    meta = artifact.metadata
    out.mkdir(parents=True)
    started = time.perf_counter()
    with torch.inference_mode():
        for path in images:
            image = np.asarray(Image.open(path).convert("RGB"))[None]
            x = images_to_tensor(image, meta["normalisation"], meta["input"]["size"])
            prob = logits_to_probabilities(artifact.model(x), image.shape[1], image.shape[2])[0].numpy()
            Image.fromarray(((prob > meta["threshold"]) * 255).astype(np.uint8)).save(out / f"{path.stem}_mask.png")
    return len(images) / (time.perf_counter() - started)


def job(model: str, src: Path, out: Path, batch_size: int | None, precision: str, backend: str) -> tuple[float, int]:
    from brainseg_ray.batch import segment
    from brainseg_ray.config import SegmenterConfig, SegmentJobConfig

    cfg = SegmentJobConfig(input=str(src), output=str(out),
                           segmenter=SegmenterConfig(model=model, batch_size=batch_size, precision=precision,
                                                     backend=backend))
    started = time.perf_counter()
    result = segment(cfg)
    return time.perf_counter() - started, result.ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data")
    parser.add_argument("--model")
    parser.add_argument("--arch", default="unet-efficientnet-lite2", help="the shipped model's architecture")
    parser.add_argument("--slices", type=int, default=800)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the job's (devices.py)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--backend", default="auto", help="auto | torch | onnxruntime")
    parser.add_argument("--check", type=int, default=32, help="slices for the bf16/fp32 check (0: skip)")
    args = parser.parse_args()

    from brainseg_ray.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from brainseg_ray.config import RayConfig
    from brainseg_ray.runtime import init_ray

    init_ray(RayConfig())
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as tmp:
        work = Path(tmp)
        root = Path(args.data) if args.data else SHARED_KAGGLE_3M
        if not root.is_dir():
            from brainseg_ray.data.synthetic import write_synthetic_dataset

            root = Path(write_synthetic_dataset(str(work / "synth"), patients=max(4, args.slices // 25 + 2), seed=3).root)
        model = _model(args, tmp)
        big = _subset(root, args.slices, work / "big" / "kaggle_3m")
        small = _subset(root, args.small, work / "small" / "kaggle_3m")
        gflop = model_gflop(model)
        peak = peak_gflops()
        # The settings as the job gets them: the Predictor resolves `auto` the same way in both.
        rate_limit, predictor = limit(model, big, args.batch_size, args.precision, args.backend)
        batch_size, backend, precision = predictor.batch_size, predictor.backend, predictor.precision
        passes = 3 if (predictor.metadata.get("postprocess") or {}).get("tta") else 1
        rate_seed = seed_loop(model, big, work / "seed-out")
        seconds_small, n_small = job(model, work / "small" / "kaggle_3m", work / "job-small", args.batch_size,
                                     args.precision, args.backend)
        seconds_big, n_big = job(model, work / "big" / "kaggle_3m", work / "job-big", args.batch_size,
                                 args.precision, args.backend)
        check = precision_check(model, big[:args.check], args.batch_size) if args.check else {}
        assert (n_small, n_big) == (len(small), len(big)), "the job must segment every slice"
    rate_job = n_big / seconds_big
    job_gflops = rate_job * gflop * passes
    cost_small, cost_big = seconds_small / n_small, seconds_big / n_big
    print(f"model: {gflop:.2f} GFLOP per forward pass per slice, {passes} pass(es) per slice; backend {backend}")
    print(f"(a) forward limit:   {rate_limit:.2f} slices/s ({len(big)} slices in memory, batch {batch_size}, {precision})")
    print(f"(b) seed-style loop: {rate_seed:.2f} slices/s (PIL per file, fp32, batch 1)")
    print(f"(c) segment job:     {rate_job:.2f} slices/s ({n_big} slices, files to full output)")
    print(f"(d) fp32 matmul:     {peak:.1f} GFLOP/s; the job: {job_gflops:.1f} GFLOP/s, ratio {job_gflops / peak:.3f}")
    print(f"c/a = {rate_job / rate_limit:.3f}   c/b = {rate_job / rate_seed:.3f}")
    print(f"job cost per slice: {cost_small * 1000:.1f} ms at {n_small}, {cost_big * 1000:.1f} ms at {n_big}; "
          f"ratio {cost_big / cost_small:.3f}")
    if check:
        print(f"precision check: bf16 masks agree with fp32 on {check['bf16_mask_agreement'] * 100:.3f} % of pixels; "
              f"bf16/fp32 speed {check['bf16_vs_fp32_speed']:.2f} ({check['check_slices']} slices; native bf16 on "
              f"this CPU: {'yes' if check['cpu_native_bf16'] else 'no'}; auto chose {precision})")
    print(json.dumps({**{k: (round(v, 5) if isinstance(v, float) else v) for k, v in check.items()},"limit_slices_per_s": round(rate_limit, 2), "seed_loop_slices_per_s": round(rate_seed, 2),
                      "job_slices_per_s": round(rate_job, 2), "ratio_vs_limit": round(rate_job / rate_limit, 3),
                      "ratio_vs_seed_loop": round(rate_job / rate_seed, 3),
                      "cost_ms_small": round(cost_small * 1000, 2), "cost_ms_large": round(cost_big * 1000, 2),
                      "cost_ratio_800_vs_200": round(cost_big / cost_small, 3), "slices_small": n_small,
                      "slices_large": n_big, "model": args.model or args.arch, "batch_size": batch_size,
                      "precision": precision, "cpus": os.cpu_count(), "backend": backend,
                      "model_gflop": round(gflop, 3), "peak_gflops": round(peak, 1), "job_gflops": round(job_gflops, 1),
                      "ratio_vs_peak": round(job_gflops / peak, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
