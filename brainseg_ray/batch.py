"""The bulk segmentation job: every slice of a folder, S3 prefix or archive(s) through one
Segmenter per Ray actor, into masks, overlays and tables of findings.

Exactly once, resumable. The catalog is cut into tasks of whole patients (3-D post-processing needs
all of a patient's slices together) in a deterministic order, so the same input always gives the
same tasks. A task writes its masks and overlays, then its result rows as DST/_parts/<task>.parquet
in one atomic write: a part that exists is a finished task. A rerun of the same command skips
finished tasks; a task cut short (job killed, actor lost) is simply done again, rewriting the same
bytes. When every task has its part, the driver merges them (with the catalog's own error rows)
into results.parquet and patients.parquet, and writes manifest.json last: its presence means the
output is complete. `shard=i/n` runs every n-th task only, so independent submissions can share
the work; whichever finds all parts present writes the final tables.

    DST/results.parquet                       one row per slice file found (status ok | error)
    DST/patients.parquet                      one row per patient
    DST/masks/<pid>/<pid>_<n>_mask.tif        256x256 uint8 0/255 (the kaggle_3m mask naming)
    DST/overlays/<pid>/<pid>_<n>.png          the mask on the FLAIR channel
    DST/manifest.json                         counts, model, options, timing; written last
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from brainseg_ray import storage
from brainseg_ray.config import SegmentJobConfig, to_dict
from brainseg_ray.runtime import cpus_per_actor, gpus_per_actor
from brainseg_ray.data.catalog import Catalog, SliceRecord, build_catalog
from brainseg_ray.data.tasks import map_tasks, tasks_in

PARTS_DIR = "_parts"
JOB_FILE = "job.json"
RESULTS_FILE = "results.parquet"
PATIENTS_FILE = "patients.parquet"
MANIFEST_FILE = "manifest.json"

RESULTS_SCHEMA = pa.schema([
    ("patient_id", pa.string()),
    ("slice_index", pa.int32()),
    ("source_uri", pa.string()),
    ("status", pa.string()),  # ok | error
    ("error", pa.string()),  # the file and the reason, for status error
    ("tumor_present", pa.bool_()),
    ("tumor_area_px", pa.int64()),
    ("tumor_area_mm2", pa.float64()),
    ("bbox", pa.list_(pa.int32(), 4)),  # x0, y0, x1, y1; x1/y1 exclusive; null without tumour
    ("confidence", pa.float64()),
    ("mask_uri", pa.string()),
    ("overlay_uri", pa.string()),
    ("model_version", pa.string()),
])


class SegmentJobError(Exception):
    """A job that cannot start or continue; the message says why."""


@dataclass(frozen=True)
class SegmentTask:
    task_id: str
    source: int
    records: tuple[SliceRecord, ...]


@dataclass
class SegmentResult:
    output: str
    found: int
    ok: int
    errors: int
    complete: bool
    tasks_run: int
    tasks_skipped: int
    manifest: dict | None

    def summary_line(self) -> str:
        state = "complete" if self.complete else "partial (other shards still to run)"
        return (f"segment: {self.found} slice files found, {self.ok} segmented, {self.errors} errors; "
                f"{self.tasks_run} tasks run, {self.tasks_skipped} already done; {state} -> {self.output}")


def parse_shard(shard: str | None) -> tuple[int, int]:
    if not shard:
        return 0, 1
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise SegmentJobError(f"shard {shard!r} is not of the form i/n (e.g. 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise SegmentJobError(f"shard {shard!r}: need 0 <= i < n")
    return index, count


def plan_tasks(catalog: Catalog, slices_per_task: int) -> list[SegmentTask]:
    """Whole patients per task, in a fixed order (listing order for streamed archives, so each
    task reads one stretch of the stream; patient id order otherwise)."""
    tasks: list[SegmentTask] = []
    for s, source in enumerate(catalog.sources):
        by_patient: dict[str, list[SliceRecord]] = defaultdict(list)
        records = sorted((r for r in catalog.good() if r.source == s),
                         key=(lambda r: r.order) if source.sequential else (lambda r: (r.patient_id, r.slice_index)))
        for record in records:
            by_patient[record.patient_id].append(record)
        chunk: list[SliceRecord] = []
        for patient_records in by_patient.values():
            if chunk and len(chunk) + len(patient_records) > slices_per_task:
                tasks.append(SegmentTask(f"s{s:03d}-t{len(tasks):05d}", s, tuple(chunk)))
                chunk = []
            chunk.extend(patient_records)
        if chunk:
            tasks.append(SegmentTask(f"s{s:03d}-t{len(tasks):05d}", s, tuple(chunk)))
    return tasks


def mask_relpath(patient_id: str, slice_index: int) -> str:
    return f"masks/{patient_id}/{patient_id}_{slice_index}_mask.tif"


def overlay_relpath(patient_id: str, slice_index: int) -> str:
    return f"overlays/{patient_id}/{patient_id}_{slice_index}.png"


def _error_row(record: SliceRecord, file: str, reason: str, version: str) -> dict:
    return {"patient_id": record.patient_id, "slice_index": record.slice_index, "source_uri": record.uri,
            "status": "error", "error": f"{file}: {reason}", "model_version": version}


def _tiff_bytes(mask01: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (mask01 * 255).astype(np.uint8))
    return buffer.getvalue()


class TaskRunner:
    """Ray Data actor: one Segmenter, loaded once; each call runs whole tasks."""

    def __init__(self, cfg: SegmentJobConfig, sources):
        from brainseg_ray.compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        from brainseg_ray.inference.segmenter import Segmenter

        self.cfg, self.sources = cfg, sources
        # Ray sets OMP_NUM_THREADS=1 in its workers: give torch the CPUs this actor holds.
        self.threads = cfg.segmenter.threads or max(1, int(cfg.cpus_per_actor or 1))
        self.segmenter = Segmenter(dataclasses.replace(cfg.segmenter, threads=self.threads), s3=cfg.s3,
                                   use_gpu=cfg.use_gpu)

    def __call__(self, batch: dict) -> dict:
        ids = []
        for task in tasks_in(batch):
            self.run(task)
            ids.append(task.task_id)
        return {"task_id": np.array(ids)}

    def run(self, task: SegmentTask) -> None:
        from brainseg_ray.data.decode import SliceError, read_pixels, to_image
        from brainseg_ray.rendering import encode_png

        cfg, version = self.cfg, self.segmenter.version
        contents = dict(self.sources[task.source].read([r.image_path for r in task.records]))
        rows, good, images = [], [], []
        for record in task.records:
            data = contents.get(record.image_path)
            try:
                if isinstance(data, Exception) or data is None:
                    raise SliceError("read_error", f"cannot read: {data}")
                image, _ = to_image(read_pixels(data, allowed=("TIFF", "PNG", "JPEG")))
            except SliceError as exc:
                rows.append(_error_row(record, record.image_uri, f"{exc.code}: {exc.reason}", version))
                continue
            good.append(record)
            images.append(image)
        if images:
            stack = np.stack(images)
            results = self.segmenter.segment(stack, [r.patient_id for r in good], [r.slice_index for r in good])
            for record, image, result in zip(good, stack, results):
                mask_uri = storage.join(cfg.output, *mask_relpath(record.patient_id, record.slice_index).split("/"))
                storage.write_bytes(mask_uri, _tiff_bytes(result.mask), cfg.s3)
                overlay_uri = None
                if cfg.write_overlays:
                    overlay_uri = storage.join(cfg.output,
                                               *overlay_relpath(record.patient_id, record.slice_index).split("/"))
                    storage.write_bytes(overlay_uri, encode_png(self.segmenter.overlay(image, result.mask)), cfg.s3)
                f = result.findings
                rows.append({"patient_id": record.patient_id, "slice_index": record.slice_index,
                             "source_uri": record.image_uri, "status": "ok", "error": None,
                             "tumor_present": f.tumor_present, "tumor_area_px": f.tumor_area_px,
                             "tumor_area_mm2": f.tumor_area_mm2, "bbox": list(f.bbox) if f.bbox else None,
                             "confidence": f.confidence, "mask_uri": mask_uri, "overlay_uri": overlay_uri,
                             "model_version": version})
        # The part is written last and in one piece: its presence means the task is done.
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), buffer)
        storage.write_bytes(storage.join(cfg.output, PARTS_DIR, f"{task.task_id}.parquet"), buffer.getvalue(), cfg.s3)


def _job_record(cfg: SegmentJobConfig, version: str, tasks: list[SegmentTask]) -> dict:
    options = {k: v for k, v in to_dict(cfg).items() if k not in ("ray", "s3", "shard", "concurrency",
                                                                  "cpus_per_actor", "use_gpu", "gpus_per_actor")}
    return {"input": cfg.input, "model_version": version, "options": options, "tasks": len(tasks)}


def _check_or_write_job(cfg: SegmentJobConfig, record: dict) -> None:
    """An output folder belongs to one input, model and set of options: a rerun continues it,
    anything else is refused rather than mixed in."""
    uri = storage.join(cfg.output, PARTS_DIR, JOB_FILE)
    if storage.exists(uri, cfg.s3):
        before = json.loads(storage.read_bytes(uri, cfg.s3))
        changed = [k for k in ("input", "model_version", "options", "tasks") if before.get(k) != record.get(k)]
        if changed:
            raise SegmentJobError(f"{cfg.output} holds a run with another {', '.join(changed)}; "
                                  "use another --output, or empty it")
        return
    storage.write_bytes(uri, json.dumps(record, indent=1, default=str).encode(), cfg.s3)


def _finished_tasks(cfg: SegmentJobConfig) -> set[str]:
    fs, root = storage.filesystem(cfg.output, cfg.s3)
    folder = f"{root}/{PARTS_DIR}"
    if not fs.exists(folder):
        return set()
    return {p.rsplit("/", 1)[-1][: -len(".parquet")] for p in fs.ls(folder, detail=False) if p.endswith(".parquet")}


def segment(cfg: SegmentJobConfig) -> SegmentResult:
    """Run the bulk job (Ray must be initialised)."""
    import ray

    from brainseg_ray.models.artifact import check_artifact

    if not cfg.input or not cfg.output or not cfg.segmenter.model:
        raise SegmentJobError("segment needs --input, --output and --model")
    shard_index, shard_count = parse_shard(cfg.shard)
    started = time.time()
    version = check_artifact(cfg.segmenter.model, cfg.s3).get("version", "")  # fail fast on a bad model
    catalog = build_catalog(cfg.input, cfg.s3, masks="optional")
    tasks = plan_tasks(catalog, cfg.slices_per_task)
    _check_or_write_job(cfg, _job_record(cfg, version, tasks))
    done = _finished_tasks(cfg)
    mine = [t for i, t in enumerate(tasks) if i % shard_count == shard_index]
    todo = [t for t in mine if t.task_id not in done]
    print(f"segment: {catalog.found} slice files, {len(tasks)} tasks ({len(mine) - len(todo)} of this "
          f"shard's {len(mine)} already done)", file=sys.stderr)
    if todo:
        gpus = gpus_per_actor(cfg.use_gpu, cfg.gpus_per_actor)
        # Decided here for the actors: the CPUs they hold, and a GPU exactly when Ray gives them one.
        cfg = dataclasses.replace(cfg, cpus_per_actor=cpus_per_actor(cfg.concurrency, cfg.cpus_per_actor),
                                  use_gpu=gpus > 0)
        ray.data.DataContext.get_current().enable_progress_bars = False
        finished = map_tasks(
            todo, TaskRunner, fn_constructor_kwargs={"cfg": cfg, "sources": catalog.sources},
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_cpus=cfg.cpus_per_actor, num_gpus=gpus)
        for _ in finished.iter_batches(batch_size=None):
            pass
    done = _finished_tasks(cfg)
    complete = all(t.task_id in done for t in tasks)
    manifest = _merge(cfg, catalog, tasks, version, started) if complete else None
    counts = manifest["counts"] if manifest else {"found": catalog.found, "ok": 0, "error": 0}
    return SegmentResult(cfg.output, catalog.found, counts["ok"], counts["error"], complete,
                         len(todo), len(mine) - len(todo), manifest)


def _merge(cfg: SegmentJobConfig, catalog: Catalog, tasks: list[SegmentTask], version: str, started: float) -> dict:
    from brainseg_ray.inference.postprocess import patient_volume_mm3

    parts = [pq.read_table(io.BytesIO(storage.read_bytes(storage.join(cfg.output, PARTS_DIR, f"{t.task_id}.parquet"),
                                                         cfg.s3))) for t in tasks]
    rejected = [_error_row(r, r.uri, f"{r.error_code}: {r.error}", version) for r in catalog.rejected()]
    results = pa.concat_tables([pa.Table.from_pylist(rejected, schema=RESULTS_SCHEMA), *parts])
    results = results.sort_by([("patient_id", "ascending"), ("slice_index", "ascending"), ("source_uri", "ascending")])
    rows = results.to_pylist()
    ok = sum(1 for r in rows if r["status"] == "ok")
    errors = len(rows) - ok
    if len(rows) != catalog.found:  # every slice file found yields exactly one row
        raise SegmentJobError(f"{len(rows)} result rows for {catalog.found} slice files: the parts are inconsistent")

    per_patient: dict[str, dict] = {}
    for r in rows:
        p = per_patient.setdefault(r["patient_id"], {"patient_id": r["patient_id"], "slices": 0, "errors": 0,
                                                     "tumour_slices": 0, "areas": [], "largest": (0, None)})
        p["slices"] += 1
        if r["status"] != "ok":
            p["errors"] += 1
            continue
        p["tumour_slices"] += int(bool(r["tumor_present"]))
        p["areas"].append(r["tumor_area_px"])
        if r["tumor_area_px"] > p["largest"][0]:
            p["largest"] = (r["tumor_area_px"], r["slice_index"])
    seg = cfg.segmenter
    patients = pa.Table.from_pylist([
        {"patient_id": p["patient_id"], "slices": p["slices"], "errors": p["errors"], "tumour_slices": p["tumour_slices"],
         "tumor_volume_mm3": patient_volume_mm3(p["areas"], seg.pixel_spacing_mm, seg.slice_thickness_mm),
         "largest_area_slice": p["largest"][1], "largest_area_px": p["largest"][0]}
        for p in per_patient.values()
    ], schema=pa.schema([("patient_id", pa.string()), ("slices", pa.int64()), ("errors", pa.int64()),
                         ("tumour_slices", pa.int64()), ("tumor_volume_mm3", pa.float64()),
                         ("largest_area_slice", pa.int32()), ("largest_area_px", pa.int64())]))
    for name, table in ((RESULTS_FILE, results), (PATIENTS_FILE, patients)):
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(storage.join(cfg.output, name), buffer.getvalue(), cfg.s3)
    finished = time.time()
    manifest = {
        "kind": "brainseg-ray segment",
        "input": cfg.input,
        "sources": [s.uri for s in catalog.sources],
        "output": cfg.output,
        "counts": {"found": catalog.found, "ok": ok, "error": errors},
        "model": {"uri": seg.model, "version": version},
        "options": to_dict(cfg),
        "finished_at": datetime.fromtimestamp(finished, timezone.utc).isoformat(timespec="seconds"),
        "last_run_seconds": round(finished - started, 3),
        "last_run_slices_per_s": round(catalog.found / (finished - started), 2),
    }
    storage.write_bytes(storage.join(cfg.output, MANIFEST_FILE), json.dumps(manifest, indent=2, default=str).encode(),
                        cfg.s3)
    return manifest
