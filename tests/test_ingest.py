"""Ingest: TIFF slices from folders, S3 and archives into the Parquet slices table."""

from __future__ import annotations

import glob
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import tifffile

from brainseg_ray import storage
from brainseg_ray.config import IngestConfig
from brainseg_ray.data import schema
from brainseg_ray.data.ingest import ingest
from brainseg_ray.data.tables import decode_tensor, read_slices_table
from conftest import upload_tree

CONTENT_COLUMNS = ["patient_id", "slice_index", "labelled", "has_tumor", "tumor_pixels", "resized"]


def run_ingest(source, out, **options):
    result = ingest(IngestConfig(source=str(source), out=str(out), **options))
    assert result.written + result.errors == result.found  # the invariant, on every run
    return result


def content(out) -> dict:
    """What must not depend on where the slices came from (URIs do)."""
    table = read_slices_table(str(out))
    data = {c: table.column(c).to_pylist() for c in CONTENT_COLUMNS}
    data["image"] = decode_tensor(table.column("image"), schema.IMAGE_SHAPE)
    data["mask"] = decode_tensor(table.column("mask"), schema.MASK_SHAPE)
    return data


def assert_same_content(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def make_archive(root: Path, path: Path) -> Path:
    """Archive the kaggle_3m folder the way users download it: lgg-mri-segmentation/kaggle_3m/..."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for file in sorted(root.rglob("*")):
                if file.is_file():
                    zf.write(file, f"lgg-mri-segmentation/kaggle_3m/{file.relative_to(root)}")
    else:
        # gzip level 1: the TIFFs are compressed already, and level 9 took 1.4 s longer for the same size
        with tarfile.open(path, "w:gz", compresslevel=1) if path.name.endswith("gz") else tarfile.open(path, "w") as tar:
            tar.add(root, arcname="lgg-mri-segmentation/kaggle_3m")
    return path


def test_synthetic_folder_round_trips_pixel_for_pixel(ray_local, synthetic_root, tmp_path):
    result = run_ingest(synthetic_root, tmp_path / "out")
    images = sorted(p for p in synthetic_root.rglob("*.tif") if not p.name.endswith("_mask.tif"))
    assert (result.found, result.written, result.errors) == (len(images), len(images), 0)
    table = read_slices_table(str(tmp_path / "out"))
    got_images = decode_tensor(table.column("image"), schema.IMAGE_SHAPE)
    got_masks = decode_tensor(table.column("mask"), schema.MASK_SHAPE)
    for i, uri in enumerate(table.column("source_uri").to_pylist()):
        np.testing.assert_array_equal(got_images[i], tifffile.imread(uri))
        expected_mask = tifffile.imread(uri.replace(".tif", "_mask.tif"))
        np.testing.assert_array_equal(got_masks[i], (expected_mask > 0).astype(np.uint8))
        assert table.column("tumor_pixels")[i].as_py() == int((expected_mask > 0).sum())
    # Sorted by slice number, not by name (_1, _10, _11, ... in name order).
    first = table.filter(pc.equal(table.column("patient_id"), table.column("patient_id")[0]))
    assert first.column("slice_index").to_pylist() == list(range(1, first.num_rows + 1))


def test_manifest_profile_and_clinical_fields(ray_local, synthetic_root, tmp_path):
    run_ingest(synthetic_root, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / schema.MANIFEST_FILE).read_text())
    table = read_slices_table(str(tmp_path / "out"))
    counts = manifest["counts"]
    assert counts["files_found"] == counts["slices_written"] == table.num_rows and counts["errors"] == 0
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    profile = manifest["profile"]
    assert profile["patients"] == len(set(table.column("patient_id").to_pylist()))
    assert profile["tumour_slices"] == sum(table.column("has_tumor").to_pylist())
    assert sum(i["slices"] for i in profile["institutions"].values()) == table.num_rows
    images = decode_tensor(table.column("image"), schema.IMAGE_SHAPE).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(profile["channels"]["mean"], images.mean(0), rtol=1e-9)
    np.testing.assert_allclose(profile["channels"]["std"], images.std(0), rtol=1e-6)
    assert (tmp_path / "out" / schema.PROFILE_PNG).read_bytes().startswith(b"\x89PNG")
    # data.csv fields are joined by patient (data.csv names patients without the scan date).
    assert "RNASeqCluster" in table.column_names and "RNASeqCluster" in manifest["clinical_columns"]
    assert len(manifest["fingerprint"]) == 64


def test_same_content_from_folder_s3_and_archives(ray_local, synthetic_root, tmp_path, s3_bucket):
    run_ingest(synthetic_root, tmp_path / "folder")
    expected = content(tmp_path / "folder")
    fingerprint = json.loads((tmp_path / "folder" / schema.MANIFEST_FILE).read_text())["fingerprint"]

    upload_tree(synthetic_root, f"{s3_bucket}/prefix/kaggle_3m")
    tgz = make_archive(synthetic_root, tmp_path / "lgg.tar.gz")
    zipped = make_archive(synthetic_root, tmp_path / "lgg.zip")
    storage.write_bytes(f"{s3_bucket}/lgg.tar.gz", tgz.read_bytes())
    storage.write_bytes(f"{s3_bucket}/lgg.zip", zipped.read_bytes())
    cases = {
        "s3 prefix -> s3": (f"{s3_bucket}/prefix", f"{s3_bucket}/out-prefix"),
        "local tar.gz": (tgz, tmp_path / "tgz"),
        "local zip": (zipped, tmp_path / "zip"),
        "s3 tar.gz": (f"{s3_bucket}/lgg.tar.gz", tmp_path / "s3tgz"),
        "s3 zip -> s3": (f"{s3_bucket}/lgg.zip", f"{s3_bucket}/out-zip"),
    }
    for name, (source, out) in cases.items():
        result = run_ingest(source, out, tasks_per_archive=3, slices_per_task=16)
        assert result.errors == 0, name
        assert_same_content(content(out), expected)
        manifest = json.loads(storage.read_bytes(storage.join(str(out), schema.MANIFEST_FILE)))
        assert manifest["fingerprint"] == fingerprint, name


def test_unlabelled_data_is_kept_without_masks(ray_local, synthetic_root, tmp_path):
    source = tmp_path / "unlabelled"
    shutil.copytree(synthetic_root, source, ignore=shutil.ignore_patterns("*_mask.tif"))
    result = run_ingest(source, tmp_path / "out")
    assert result.errors == 0 and result.written > 0
    table = read_slices_table(str(tmp_path / "out"))
    assert not any(table.column("labelled").to_pylist())
    assert set(table.column("has_tumor").to_pylist()) == {None}
    assert result.manifest["counts"]["unlabelled"] == result.written


def test_rerun_replaces_previous_output(ray_local, synthetic_root, tmp_path):
    out = tmp_path / "out"
    run_ingest(synthetic_root, out, slices_per_task=8)
    many = len(list((out / schema.SLICES_DIR).iterdir()))
    run_ingest(synthetic_root, out, slices_per_task=1000)
    assert len(list((out / schema.SLICES_DIR).iterdir())) == 1 < many
    assert read_slices_table(str(out)).num_rows == json.loads((out / schema.MANIFEST_FILE).read_text())["counts"]["slices_written"]


@pytest.mark.shared_data
def test_real_patients_round_trip_pixel_for_pixel(ray_local, shared_subset, tmp_path):
    result = run_ingest(shared_subset, tmp_path / "out")
    images = [p for p in glob.glob(str(shared_subset / "*" / "*.tif")) if not p.endswith("_mask.tif")]
    assert (result.written, result.errors) == (len(images), 0)
    table = read_slices_table(str(tmp_path / "out"))
    got = decode_tensor(table.column("image"), schema.IMAGE_SHAPE)
    masks = decode_tensor(table.column("mask"), schema.MASK_SHAPE)
    for i, uri in enumerate(table.column("source_uri").to_pylist()):
        np.testing.assert_array_equal(got[i], tifffile.imread(uri))
        np.testing.assert_array_equal(masks[i], tifffile.imread(uri.replace(".tif", "_mask.tif")) // 255)
    assert set(table.column("RNASeqCluster").to_pylist()) - {None}, "data.csv fields joined"


@pytest.mark.shared_data
def test_all_shared_slices_same_from_folder_and_s3_tar_gz(ray_local, shared_root, tmp_path, s3_bucket):
    folder = run_ingest(shared_root, tmp_path / "folder")
    assert (folder.found, folder.written, folder.errors) == (1787, 1787, 0)
    tgz = make_archive(shared_root, tmp_path / "lgg.tar.gz")
    storage.write_bytes(f"{s3_bucket}/lgg.tar.gz", tgz.read_bytes())
    from_s3 = run_ingest(f"{s3_bucket}/lgg.tar.gz", f"{s3_bucket}/out")
    assert (from_s3.written, from_s3.errors) == (1787, 0)
    assert from_s3.manifest["fingerprint"] == folder.manifest["fingerprint"]
    assert from_s3.manifest["profile"] == folder.manifest["profile"]
    assert folder.manifest["profile"]["tumour_slices"] == 637
