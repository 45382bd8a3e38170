"""Ingest throughput: the Ray Data ingest against a plain single-process loop, on the same files.

    .venv/bin/python bench/ingest.py [--data DIR] [--slices-per-task N] [--repeats 3]

DIR is a kaggle_3m folder (patient folders of <PID>_<i>.tif and <PID>_<i>_mask.tif, data.csv).
Without --data the shared LGG development data is used, or synthetic data if that is absent.

(a) `ingest()` on a local Ray instance with every CPU, after a warm-up ingest of a few patients so
    that worker start-up is not counted (on a cluster the workers are a warm pool).
(b) the loop a user would write without this project: tifffile.imread each image and mask, build
    the same columns, write one Parquet file with the same layout and compression at the end.

Each side runs --repeats times, the two sides taking turns; the median counts. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from brainseg_ray.dev_data import SHARED_KAGGLE_3M
WARM_UP_PATIENTS = 3


def _slice_pairs(root: Path) -> list[tuple[str, int, Path, Path]]:
    """(patient, slice index, image, mask) for every image that has its mask, in a stable order."""
    pairs = []
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(patient_dir.glob("*.tif")):
            if image.stem.endswith("_mask"):
                continue
            mask = image.with_name(f"{image.stem}_mask.tif")
            index = image.stem.rsplit("_", 1)[-1]
            if mask.exists() and index.isdigit():
                pairs.append((patient_dir.name, int(index), image, mask))
    return pairs


def _clinical(root: Path) -> tuple[dict[str, dict], dict]:
    """data.csv rows keyed by patient (its id without the scan date), and the column types."""
    import pyarrow.csv as pacsv

    csv = root / "data.csv"
    if not csv.exists():
        return {}, {}
    table = pacsv.read_csv(csv)
    types = {f.name: f.type for f in table.schema if f.name != "Patient"}
    return {str(row.pop("Patient")): row for row in table.to_pylist()}, types


def loop_ingest(root: Path, out_file: Path) -> int:
    """The baseline: one process, tifffile, one Parquet file. Returns the rows written."""
    import pyarrow as pa
    import tifffile

    from brainseg_ray.data import tables

    clinical, clinical_types = _clinical(root)
    schema = tables.slices_schema(clinical_types)
    columns: dict[str, list] = {name: [] for name in schema.names if name not in ("image", "mask")}
    images, masks = [], []
    for patient, index, image_file, mask_file in _slice_pairs(root):
        image = np.asarray(tifffile.imread(image_file))
        mask = (np.asarray(tifffile.imread(mask_file)) > 0).astype(np.uint8)
        tumour = int(np.count_nonzero(mask))
        fields = clinical.get(patient.rsplit("_", 1)[0], {})
        row = {"patient_id": patient, "slice_index": index, "labelled": True, "has_tumor": tumour > 0,
               "tumor_pixels": tumour, "resized": False, "source_uri": str(image_file),
               "mask_uri": str(mask_file), **{c: fields.get(c) for c in clinical_types}}
        for name, value in row.items():
            columns[name].append(value)
        images.append(image)
        masks.append(mask)
    arrays = {name: pa.array(values, type=schema.field(name).type) for name, values in columns.items()}
    arrays["image"] = tables.encode_tensor(np.stack(images))
    arrays["mask"] = tables.encode_tensor(np.stack(masks))
    table = pa.Table.from_arrays([arrays[name] for name in schema.names], schema=schema)
    tables.write_fragment(table, str(out_file))
    return table.num_rows


def _warm_up_copy(root: Path, into: Path) -> Path:
    """A kaggle_3m folder with the first few patients of `root`, for the warm-up ingest."""
    target = into / "kaggle_3m"
    target.mkdir(parents=True)
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir())[:WARM_UP_PATIENTS]:
        shutil.copytree(patient_dir, target / patient_dir.name)
    if (root / "data.csv").exists():
        shutil.copy(root / "data.csv", target / "data.csv")
    return target


def _timed_pairs(runs: dict, repeats: int) -> dict[str, tuple[float, int]]:
    """{label: (median seconds, rows)} over `repeats` rounds; each round runs every side once, in
    turn, so that other work on the machine weighs on both sides alike. Prints each run."""
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    rows: dict[str, int] = {}
    for attempt in range(1, repeats + 1):
        for label, run in runs.items():
            started = time.perf_counter()
            count = run()
            seconds[label].append(time.perf_counter() - started)
            print(f"  {label} run {attempt}: {count} slices in {seconds[label][-1]:.2f} s", flush=True)
            assert rows.setdefault(label, count) == count, (label, rows[label], count)
    return {label: (statistics.median(seconds[label]), rows[label]) for label in runs}


def _resolve_data(requested: str | None, scratch: Path) -> Path:
    if requested:
        root = Path(requested)
        if not root.is_dir():
            sys.exit(f"bench: no such data folder: {root}")
        return root
    if SHARED_KAGGLE_3M.is_dir():
        return SHARED_KAGGLE_3M
    from brainseg_ray.data.synthetic import write_synthetic_dataset

    summary = write_synthetic_dataset(str(scratch / "synthetic"), patients=60)
    print(f"bench: {SHARED_KAGGLE_3M} not found; using synthetic data ({summary.slices} slices, 60 patients) "
          f"in {summary.root}", flush=True)
    return Path(summary.root)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help=f"kaggle_3m folder (default {SHARED_KAGGLE_3M}, else synthetic)")
    parser.add_argument("--slices-per-task", type=int, default=None,
                        help="IngestConfig.slices_per_task (default: the config's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median counts")
    args = parser.parse_args(argv)

    # A private local instance: no token auth, no usage reporting.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from brainseg_ray.config import IngestConfig, RayConfig
    from brainseg_ray.data.ingest import ingest
    from brainseg_ray.runtime import init_ray

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        scratch = Path(tmp)
        root = _resolve_data(args.data, scratch)
        slices = len(_slice_pairs(root))
        task_size = {} if args.slices_per_task is None else {"slices_per_task": args.slices_per_task}
        print(f"bench: {slices} slices in {root}; {cpus} CPUs; slices_per_task="
              f"{task_size.get('slices_per_task', IngestConfig().slices_per_task)}", flush=True)

        init_ray(RayConfig(num_cpus=cpus))
        ray.data.DataContext.get_current().enable_progress_bars = False
        warm_root = _warm_up_copy(root, scratch / "warm-up")
        # Small tasks, at least two per CPU, so that every worker process is started.
        warm_task_size = max(1, len(_slice_pairs(warm_root)) // (2 * cpus))
        started = time.perf_counter()
        ingest(IngestConfig(source=str(warm_root), out=str(scratch / "warm-up-out"), slices_per_task=warm_task_size))
        print(f"bench: warm-up ingest of {WARM_UP_PATIENTS} patients took {time.perf_counter() - started:.2f} s "
              "(not counted: it starts Ray's workers)", flush=True)

        def ray_run() -> int:
            result = ingest(IngestConfig(source=str(root), out=str(scratch / "ray-out"), **task_size))
            assert result.errors == 0, result.manifest["errors_by_code"]
            return result.written

        def loop_run() -> int:
            return loop_ingest(root, scratch / "loop.parquet")

        timings = _timed_pairs({"ray ingest": ray_run, "loop": loop_run}, args.repeats)
        (ray_s, ray_rows), (loop_s, loop_rows) = timings["ray ingest"], timings["loop"]
        ray.shutdown()

    assert ray_rows == loop_rows == slices, (ray_rows, loop_rows, slices)
    ray_rate, loop_rate = ray_rows / ray_s, loop_rows / loop_s
    print(f"ray ingest: {ray_rows} slices in {ray_s:.2f} s = {ray_rate:.0f} slices/s "
          f"(warm, median of {args.repeats})")
    print(f"loop: {loop_rows} slices in {loop_s:.2f} s = {loop_rate:.0f} slices/s (median of {args.repeats})")
    print(f"ratio ray/loop = {ray_rate / loop_rate:.2f}")
    summary = {"ray_slices_per_s": round(ray_rate, 1), "loop_slices_per_s": round(loop_rate, 1),
               "ratio": round(ray_rate / loop_rate, 3), "slices": ray_rows, "cpus": cpus}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
