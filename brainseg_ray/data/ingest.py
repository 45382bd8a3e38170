"""Ingest: kaggle_3m-style TIFF slices -> a Parquet dataset of validated slices, with its manifest.

Flow: the catalog is built on the driver; its good records are cut into tasks; a Ray Data
map_batches stage reads, decodes and validates each task's slices and writes that task's Parquet
fragment itself (one file per task, named by the task, so a retried task overwrites its own file and
nothing is written twice), returning one small row per slice. The driver gathers those rows into
the errors table, the data profile and the manifest, which is written last.

Output under OUT:
    slices/part-NNNNN.parquet   the slices table (see schema.SLICE_COLUMNS, plus data.csv fields)
    errors.parquet              one row per slice file that could not be used: file, code, reason
    manifest.json               counts, schema version, source, data profile, fingerprint
    profile.png                 a chart of the profile
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from brainseg_ray import storage
from brainseg_ray.config import IngestConfig, to_dict
from brainseg_ray.data import schema, tables
from brainseg_ray.data.catalog import Catalog, SliceRecord, build_catalog, clinical_for
from brainseg_ray.data.decode import SliceError, read_pixels, to_image, to_mask
from brainseg_ray.data.tasks import map_tasks, tasks_in

RESULT_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("slice_index", pa.int32()),
        ("file", pa.string()),
        ("status", pa.string()),  # ok | error
        ("code", pa.string()),
        ("reason", pa.string()),
        ("labelled", pa.bool_()),
        ("has_tumor", pa.bool_()),
        ("tumor_pixels", pa.int64()),
        ("resized", pa.bool_()),
        ("channel_sum", pa.list_(pa.float64(), 3)),
        ("channel_sumsq", pa.list_(pa.float64(), 3)),
        ("pixels", pa.int64()),
        ("digest", pa.string()),
    ]
)


@dataclass
class IngestTask:
    task_id: int
    source: int
    records: list[SliceRecord]
    clinical: dict[str, dict]  # data.csv fields of the patients in this task


@dataclass
class IngestResult:
    out: str
    found: int
    written: int
    errors: int
    manifest: dict

    def summary_line(self) -> str:
        return (
            f"ingest: {self.found} slice files found, {self.written} slices written, "
            f"{self.errors} errors -> {self.out}"
        )


def _error_row(record: SliceRecord, file: str, code: str, reason: str) -> dict:
    return {"patient_id": record.patient_id or None, "slice_index": record.slice_index,
            "file": file, "status": "error", "code": code, "reason": reason}


_VALUES = np.arange(256, dtype=np.float64)


def _channel_moments(image: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel sum and sum of squares, via a 256-bin histogram (exact, and cheap on uint8)."""
    counts = np.stack([np.bincount(image[..., c].ravel(), minlength=256) for c in range(image.shape[-1])])
    counts = counts.astype(np.float64)
    return (counts @ _VALUES).tolist(), (counts @ (_VALUES * _VALUES)).tolist()


def _decode_record(record: SliceRecord, contents: dict) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(image, mask or None, resized); a SliceError raised here carries the culprit in `file`."""
    current = record.image_uri
    try:
        data = contents[record.image_path]
        if isinstance(data, Exception):
            raise SliceError("read_error", f"cannot read: {data}")
        image, source_hw = to_image(read_pixels(data))
        mask = None
        if record.mask_path is not None:
            current = record.mask_uri
            data = contents[record.mask_path]
            if isinstance(data, Exception):
                raise SliceError("read_error", f"cannot read: {data}")
            mask = to_mask(read_pixels(data), source_hw)
        return image, mask, source_hw != (schema.IMAGE_SIZE, schema.IMAGE_SIZE)
    except SliceError as exc:
        exc.file = current
        raise


def run_task(task: IngestTask, source: storage.Source, out: str, s3: storage.S3Options,
             clinical_types: dict, compression: str = "zstd", compression_level: int | None = 1) -> pa.Table:
    """Read, decode and validate one task's slices, write its fragment, return its result rows."""
    wanted = [r.image_path for r in task.records] + [r.mask_path for r in task.records if r.mask_path]
    contents = dict(source.read(wanted))
    table_schema = tables.slices_schema(clinical_types)
    results, columns = [], {name: [] for name in table_schema.names}
    images, masks = [], []
    for record in task.records:
        try:
            image, mask, resized = _decode_record(record, contents)
        except SliceError as exc:
            results.append(_error_row(record, exc.file, exc.code, f"{exc.file}: {exc.reason}"))
            continue
        labelled = mask is not None
        mask = mask if labelled else np.zeros(schema.MASK_SHAPE, np.uint8)
        tumor = int(np.count_nonzero(mask)) if labelled else None
        channel_sum, channel_sumsq = _channel_moments(image)
        images.append(image)
        masks.append(mask)
        clinical = task.clinical.get(record.patient_id, {})
        row = {"patient_id": record.patient_id, "slice_index": record.slice_index, "labelled": labelled,
               "has_tumor": None if tumor is None else tumor > 0, "tumor_pixels": tumor, "resized": resized,
               "source_uri": record.image_uri, "mask_uri": record.mask_uri,
               **{c: clinical.get(c) for c in clinical_types}}
        for name, value in row.items():
            columns[name].append(value)
        results.append({
            "patient_id": record.patient_id, "slice_index": record.slice_index, "file": record.image_uri,
            "status": "ok", "labelled": labelled, "has_tumor": row["has_tumor"], "tumor_pixels": tumor,
            "resized": resized, "channel_sum": channel_sum, "channel_sumsq": channel_sumsq,
            "pixels": image.shape[0] * image.shape[1],
            # A change detector for the fingerprint, not a security hash: crc32 is 5x cheaper.
            "digest": f"{zlib.crc32(mask, zlib.crc32(image)):08x}",
        })
    if images:
        columns["image"], columns["mask"] = tables.encode_tensor(np.stack(images)), tables.encode_tensor(np.stack(masks))
        table = pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in table_schema], schema=table_schema)
        tables.write_fragment(table, storage.join(out, schema.SLICES_DIR, f"part-{task.task_id:05d}.parquet"),
                              s3, compression, compression_level)
    return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)


def plan_tasks(catalog: Catalog, slices_per_task: int, tasks_per_archive: int) -> list[IngestTask]:
    """Cut the good records into tasks: by patient for folders, in archive order for tar streams."""
    tasks: list[IngestTask] = []
    for s, source in enumerate(catalog.sources):
        records = [r for r in catalog.good() if r.source == s]
        if not records:
            continue
        size = slices_per_task
        if source.sequential:
            records.sort(key=lambda r: r.order)
            size = max(slices_per_task, math.ceil(len(records) / max(1, tasks_per_archive)))
        for start in range(0, len(records), size):
            chunk = records[start : start + size]
            patients = {r.patient_id for r in chunk}
            clinical = {p: clinical_for(catalog, p) for p in patients} if catalog.clinical_types else {}
            tasks.append(IngestTask(len(tasks), s, chunk, clinical))
    return tasks


def _ingest_batch(batch: dict, sources, out, s3, clinical_types, compression, compression_level) -> pa.Table:
    results = [
        run_task(task, sources[task.source], out, s3, clinical_types, compression, compression_level)
        for task in tasks_in(batch)
    ]
    return pa.concat_tables(results)


def _fingerprint(ok_rows: list[dict]) -> str:
    """Content hash of the written slices, independent of task order: models record it."""
    h = hashlib.sha256()
    for row in sorted(ok_rows, key=lambda r: (r["patient_id"], r["slice_index"])):
        h.update(f"{row['patient_id']}/{row['slice_index']}/{row['digest']}\n".encode())
    return h.hexdigest()


def _write_outputs(cfg: IngestConfig, catalog: Catalog, rows: list[dict], started: float) -> dict:
    from brainseg_ray.data.profile import build_profile, plot_profile

    # Sorted, so the profile's float sums do not depend on which task finished first.
    rows = sorted(rows, key=lambda r: (r["patient_id"] or "", r["slice_index"] or -1, r["file"] or ""))
    ok = [r for r in rows if r["status"] == "ok"]
    errors = [r for r in rows if r["status"] == "error"]
    error_table = pa.table({
        "file": pa.array([r["file"] for r in errors], pa.string()),
        "patient_id": pa.array([r["patient_id"] for r in errors], pa.string()),
        "slice_index": pa.array([r["slice_index"] for r in errors], pa.int32()),
        "code": pa.array([r["code"] for r in errors], pa.string()),
        "reason": pa.array([r["reason"] for r in errors], pa.string()),
    })
    fs, root = storage.arrow_filesystem(cfg.out, cfg.s3)
    pq.write_table(error_table, f"{root}/{schema.ERRORS_FILE}", filesystem=fs)

    profile = build_profile(ok)
    png = io.BytesIO()
    plot_profile(profile, png)
    storage.write_bytes(storage.join(cfg.out, schema.PROFILE_PNG), png.getvalue(), cfg.s3)

    by_code: dict[str, int] = {}
    for r in errors:
        by_code[r["code"]] = by_code.get(r["code"], 0) + 1
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "kind": "brainseg-ray ingest",
        "source": cfg.source,
        "sources": [s.uri for s in catalog.sources],
        "output": cfg.out,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 3),
        "counts": {
            "files_found": catalog.found,
            "slices_written": len(ok),
            "errors": len(errors),
            "resized": sum(1 for r in ok if r["resized"]),
            "unlabelled": sum(1 for r in ok if not r["labelled"]),
            "ignored_files": catalog.ignored_files,
        },
        "errors_by_code": dict(sorted(by_code.items())),
        "fingerprint": _fingerprint(ok),
        "profile": profile,
        "clinical_columns": list(catalog.clinical_types),
        "layout": {"slices": f"{schema.SLICES_DIR}/", "errors": schema.ERRORS_FILE, "profile_png": schema.PROFILE_PNG},
        "options": {k: v for k, v in to_dict(cfg).items() if k not in ("source", "out", "ray")},
    }
    storage.write_bytes(storage.join(cfg.out, schema.MANIFEST_FILE),
                        json.dumps(manifest, indent=2, default=str).encode(), cfg.s3)
    return manifest


def _clear_previous(cfg: IngestConfig) -> None:
    """An ingest rewrites its output: stale fragments of an earlier run must not mix in."""
    fs, root = storage.filesystem(cfg.out, cfg.s3)
    for name in (schema.MANIFEST_FILE, schema.SLICES_DIR, schema.ERRORS_FILE, schema.PROFILE_PNG):
        path = f"{root}/{name}"
        if fs.exists(path):
            fs.rm(path, recursive=True)
    storage.makedirs(storage.join(cfg.out, schema.SLICES_DIR), cfg.s3)


def list_sources(cfg: IngestConfig) -> Catalog:
    """The slice files ingest would read; needs no Ray, so a wrong source is reported before it starts."""
    if not cfg.source or not cfg.out:
        raise ValueError("ingest needs a source and an output (--out)")
    return build_catalog(cfg.source, cfg.s3, cfg.masks)


def ingest(cfg: IngestConfig, catalog: Catalog | None = None) -> IngestResult:
    """Run the ingest job (Ray must be initialised); returns counts and the manifest. `catalog` is
    list_sources' result when the caller listed the sources already (the CLI does)."""
    started = time.time()
    if catalog is None:
        catalog = list_sources(cfg)
    print(f"ingest: {catalog.found} slice files in {len(catalog.sources)} source(s) "
          f"({len(catalog.rejected())} rejected by name or layout)", file=sys.stderr)
    _clear_previous(cfg)
    tasks = plan_tasks(catalog, cfg.slices_per_task, cfg.tasks_per_archive)
    rows = [_error_row(r, r.uri, r.error_code, f"{r.uri}: {r.error}") for r in catalog.rejected()]
    if tasks:
        dataset = map_tasks(
            tasks,
            _ingest_batch,
            fn_kwargs=dict(sources=catalog.sources, out=cfg.out, s3=cfg.s3,
                           clinical_types=catalog.clinical_types, compression=cfg.parquet_compression,
                           compression_level=cfg.parquet_compression_level),
            num_cpus=1,
        )
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            rows.extend(batch.to_pylist())
    manifest = _write_outputs(cfg, catalog, rows, started)
    counts = manifest["counts"]
    assert counts["slices_written"] + counts["errors"] == counts["files_found"], counts
    return IngestResult(cfg.out, counts["files_found"], counts["slices_written"], counts["errors"], manifest)
