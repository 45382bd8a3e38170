"""The bulk segmentation job: output contract, error rows, resume and shards, one Segmenter."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from brainseg_ray.batch import SegmentJobError, mask_relpath, overlay_relpath, segment
from brainseg_ray.compat import ensure_torchvision_importable
from brainseg_ray.config import SegmenterConfig, SegmentJobConfig
from conftest import tiny_artifact

ensure_torchvision_importable()


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    return tiny_artifact(tmp_path_factory.mktemp("segmodel") / "model", seed=0)


def _job(model: str, src, out, **kw) -> SegmentJobConfig:
    segmenter = SegmenterConfig(model=model, precision="fp32", min_component_px=3)
    return SegmentJobConfig(input=str(src), output=str(out), segmenter=segmenter, slices_per_task=20, **kw)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.parent.name != "_parts"
            and p.name not in ("manifest.json", "results.parquet")}


@pytest.fixture(scope="module")
def full_run(ray_local, synthetic_root, model_uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "out"
    return out, segment(_job(model_uri, synthetic_root, out))


def test_output_contract(synthetic_root, full_run):
    out, result = full_run
    images = [p for p in synthetic_root.rglob("*.tif") if not p.stem.endswith("_mask")]
    assert result.complete and result.found == len(images) == result.ok and result.errors == 0
    results = pq.read_table(out / "results.parquet")
    assert results.num_rows == len(images)
    assert results.column_names == ["patient_id", "slice_index", "source_uri", "status", "error", "tumor_present",
                                    "tumor_area_px", "tumor_area_mm2", "bbox", "confidence", "mask_uri",
                                    "overlay_uri", "model_version"]
    for row in results.to_pylist():
        assert row["status"] == "ok" and row["error"] is None
        mask = tifffile.imread(out / mask_relpath(row["patient_id"], row["slice_index"]))
        assert mask.shape == (256, 256) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert int((mask > 0).sum()) == row["tumor_area_px"] and row["tumor_present"] == (row["tumor_area_px"] > 0)
        if row["bbox"] is not None:
            x0, y0, x1, y1 = row["bbox"]
            assert (mask[y0:y1, x0:x1] > 0).sum() == row["tumor_area_px"]
        assert (out / overlay_relpath(row["patient_id"], row["slice_index"])).read_bytes()[:4] == b"\x89PNG"
    patients = pq.read_table(out / "patients.parquet").to_pylist()
    assert sorted(p["patient_id"] for p in patients) == sorted({p.parent.name for p in images})
    assert sum(p["slices"] for p in patients) == len(images)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"found": len(images), "ok": len(images), "error": 0}
    assert manifest["model"]["version"] == results.column("model_version")[0].as_py()


def test_job_masks_equal_a_direct_segmenter_call(synthetic_root, model_uri, full_run):
    from brainseg_ray.inference.segmenter import Segmenter

    out, _ = full_run
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    files = sorted((p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")),
                   key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    images = np.stack([tifffile.imread(p) for p in files])
    direct = Segmenter(_job(model_uri, "", "").segmenter).segment(images)
    for path, result in zip(files, direct):
        index = int(path.stem.rsplit("_", 1)[1])
        assert np.array_equal(tifffile.imread(out / mask_relpath(patient.name, index)) > 0, result.mask.astype(bool))


def test_bad_slices_are_error_rows_and_counts_add_up(ray_local, synthetic_root, model_uri, tmp_path):
    src = tmp_path / "kaggle_3m"
    shutil.copytree(synthetic_root, src)
    patient = sorted(p for p in src.iterdir() if p.is_dir())[0]
    bad = patient / f"{patient.name}_2.tif"
    bad.write_bytes(b"not a tiff at all")
    (patient / f"{patient.name}_x.tif").write_bytes(b"")  # no slice number in the name
    result = segment(_job(model_uri, src, tmp_path / "out"))
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    errors = [r for r in rows if r["status"] == "error"]
    assert result.found == len(rows) == result.ok + result.errors and result.errors == 2 == len(errors)
    assert any(str(bad) in r["error"] for r in errors)
    assert all(r["mask_uri"] is None for r in errors)


def test_resume_after_a_partial_run_ends_identical(ray_local, synthetic_root, model_uri, full_run, tmp_path):
    out = tmp_path / "out"
    first = segment(_job(model_uri, synthetic_root, out, shard="0/2"))
    assert not first.complete and not (out / "manifest.json").exists() and first.tasks_run >= 1
    second = segment(_job(model_uri, synthetic_root, out))
    assert second.complete and second.tasks_skipped == first.tasks_run
    assert second.tasks_run + second.tasks_skipped == len(list((full_run[0] / "_parts").glob("*.parquet")))
    # The same rows and the same mask and overlay bytes as the uninterrupted run (results.parquet
    # differs only in the URIs, which name the output folder).
    assert _tree_digest(out) == _tree_digest(full_run[0])
    assert pq.read_table(out / "results.parquet").drop_columns(["mask_uri", "overlay_uri"]).equals(
        pq.read_table(full_run[0] / "results.parquet").drop_columns(["mask_uri", "overlay_uri"]))


def test_an_output_of_another_model_is_refused(ray_local, synthetic_root, full_run, tmp_path):
    other = tiny_artifact(tmp_path / "other", seed=1)
    with pytest.raises(SegmentJobError, match="model_version"):
        segment(_job(other, synthetic_root, full_run[0]))


@pytest.mark.parametrize("shard", ["2/2", "a/b", "1/0"])
def test_bad_shard_is_refused(ray_local, synthetic_root, model_uri, tmp_path, shard):
    with pytest.raises(SegmentJobError, match="shard"):
        segment(_job(model_uri, synthetic_root, tmp_path / "out", shard=shard))


def test_archive_on_s3_to_s3_gives_the_same_masks(ray_local, synthetic_root, model_uri, full_run, s3_bucket, tmp_path):
    """A .tar.gz of the folder on S3 (moto) in, an S3 prefix out: the same rows and mask bytes."""
    import tarfile

    from brainseg_ray import storage

    archive = tmp_path / "scans.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(synthetic_root, arcname="kaggle_3m")
    src = f"{s3_bucket}/in/scans.tar.gz"
    storage.write_bytes(src, archive.read_bytes())
    out = f"{s3_bucket}/out/seg"
    result = segment(_job(model_uri, src, out))
    local_out, local = full_run
    assert result.complete and (result.found, result.ok, result.errors) == (local.found, local.ok, 0)
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/results.parquet")))
    expected = pq.read_table(local_out / "results.parquet")
    assert rows.select(["patient_id", "slice_index", "tumor_area_px", "bbox"]).equals(
        expected.select(["patient_id", "slice_index", "tumor_area_px", "bbox"]))
    first = expected.slice(0, 1).to_pylist()[0]
    rel = mask_relpath(first["patient_id"], first["slice_index"])
    assert storage.read_bytes(f"{out}/{rel}") == (local_out / rel).read_bytes()
    assert rows.column("mask_uri")[0].as_py() == f"{out}/{rel}"
    assert rows.column("source_uri")[0].as_py().startswith("tar://") and storage.exists(f"{out}/manifest.json")


def test_a_model_on_an_explicit_s3_endpoint_is_read_with_the_jobs_s3_options(ray_local, synthetic_root,
                                                                           explicit_s3_model, tmp_path):
    """`brainseg segment --s3-endpoint URL` with an s3:// model: the driver's check of the model and
    the Segmenters read it through the job's S3 options, not the AWS environment."""
    from brainseg_ray.cli import main

    uri, s3 = explicit_s3_model
    src = tmp_path / "kaggle_3m"
    src.mkdir()
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    (src / patient.name).symlink_to(patient, target_is_directory=True)
    out = tmp_path / "out"
    assert main(["segment", "--model", uri, "--input", str(src), "--output", str(out),
                 "--s3-endpoint", s3.endpoint_url, "segmenter.precision=fp32"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["uri"] == uri and manifest["counts"]["error"] == 0
    assert manifest["counts"]["ok"] == len([p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")])


# Fault injection: a model and options slow enough (256 px input, flip TTA, one patient per task)
# that a kill lands while tasks are still to run.
SLOW = ["segmenter.tta=true", "slices_per_task=8", "segmenter.precision=fp32", "segmenter.min_component_px=3"]


def _slow_job(model: str, src, out) -> SegmentJobConfig:
    segmenter = SegmenterConfig(model=model, precision="fp32", min_component_px=3, tta=True)
    return SegmentJobConfig(input=str(src), output=str(out), segmenter=segmenter, slices_per_task=8)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    return tiny_artifact(tmp_path_factory.mktemp("slowmodel") / "model", seed=2, base_filters=16, input_size=256)


@pytest.fixture(scope="module")
def slow_run(ray_local, synthetic_root, slow_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("slow") / "out"
    result = segment(_slow_job(slow_model, synthetic_root, out))
    assert result.complete
    return out, result


def _parts(out: Path) -> list[Path]:
    return sorted((out / "_parts").glob("*.parquet")) if (out / "_parts").is_dir() else []


def _wait_for_first_part(out: Path, alive, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not _parts(out):
        assert alive(), "the job ended before writing its first part"
        assert time.time() < deadline, f"no task finished within {timeout} s"
        time.sleep(0.05)


def _assert_same_output(out: Path, expected: Path) -> None:
    rows = pq.read_table(out / "results.parquet")
    keys = list(zip(rows.column("patient_id").to_pylist(), rows.column("slice_index").to_pylist()))
    assert len(keys) == len(set(keys)), "a slice has more than one row"
    assert _tree_digest(out) == _tree_digest(expected)
    assert rows.drop_columns(["mask_uri", "overlay_uri"]).equals(
        pq.read_table(expected / "results.parquet").drop_columns(["mask_uri", "overlay_uri"]))


def test_killed_job_rerun_ends_identical(ray_local, synthetic_root, slow_model, slow_run, tmp_path):
    """SIGKILL the job's driver (as a cluster would lose a submitted job) once its first task is
    done; the same command again finishes the rest and the output equals an uninterrupted run."""
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "brainseg_ray.cli", "segment", "--model", slow_model, "--input",
               str(synthetic_root), "--output", str(out), "--address", address, *SLOW]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_first_part(out, lambda: first.poll() is None)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    done = len(_parts(out))
    assert not (out / "manifest.json").exists() and 1 <= done < len(_parts(slow_run[0]))

    second = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already done" in second.stderr and (out / "manifest.json").exists()
    _assert_same_output(out, slow_run[0])


def test_actor_killed_mid_run_loses_and_duplicates_nothing(ray_local, synthetic_root, slow_model, slow_run, tmp_path):
    """SIGKILL the Segmenter actor's process while it works: Ray restarts it, the task it held is
    run again, and the one run ends complete and equal to an uninterrupted run."""
    from ray.util.state import list_actors

    out = tmp_path / "out"
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = segment(_slow_job(slow_model, synthetic_root, out))
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    _wait_for_first_part(out, worker.is_alive)
    address = ray_local.get_runtime_context().gcs_address  # another Ray may run on this machine
    actors = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True)
              if "TaskRunner" in (a.class_name or "")]
    assert len(actors) == 1, actors
    os.kill(actors[0].pid, signal.SIGKILL)
    killed_at = len(_parts(out))
    worker.join(timeout=400)
    assert not worker.is_alive() and "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert killed_at < len(_parts(slow_run[0])), "the job had finished before the kill"
    assert result.complete and result.ok == result.found == slow_run[1].found
    _assert_same_output(out, slow_run[0])


def test_a_damaged_model_is_refused_before_any_work(ray_local, synthetic_root, model_uri, tmp_path, capsys):
    from brainseg_ray.cli import main

    damaged = tmp_path / "damaged"
    shutil.copytree(model_uri, damaged)
    weights = damaged / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    code = main(["segment", "--model", str(damaged), "--input", str(synthetic_root), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(damaged) in err and "SHA-256" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.shared_data
def test_real_slices_give_one_row_each_and_a_mask_layout(ray_local, shared_subset, model_uri, tmp_path):
    """Three real LGG patients: every slice file found is one ok row, and DST/masks pairs with the
    input by the kaggle_3m naming (<pid>_<n>.tif -> <pid>_<n>_mask.tif)."""
    out = tmp_path / "out"
    result = segment(_job(model_uri, shared_subset, out))
    images = [p for p in shared_subset.glob("*/*.tif") if not p.stem.endswith("_mask")]
    assert result.complete and result.found == result.ok == len(images) and result.errors == 0
    for image in images:
        patient, index = image.parent.name, int(image.stem.rsplit("_", 1)[1])
        mask = tifffile.imread(out / mask_relpath(patient, index))
        assert mask.shape == tifffile.imread(image).shape[:2]
    patients = pq.read_table(out / "patients.parquet").to_pylist()
    assert {p["patient_id"]: p["slices"] for p in patients} == {
        d.name: len([i for i in images if i.parent == d]) for d in {i.parent for i in images}}


def test_score_reads_the_jobs_mask_files(synthetic_root, full_run, tmp_path, capsys):
    """`brainseg score` compares the mask files a job wrote with the reference masks: the
    reference masks copied over the job's files score a Dice of 1, and emptying one patient's
    files drops exactly that patient to 0. The output is a copy: masks are found under it."""
    import tifffile

    from brainseg_ray.cli import main

    out = tmp_path / "out"
    shutil.copytree(full_run[0], out)
    rows = pq.read_table(out / "results.parquet").to_pylist()
    truth = {p.name.replace("_mask", ""): p for p in synthetic_root.rglob("*_mask.tif")}
    for row in rows:
        mask_file = out / "masks" / row["patient_id"] / f"{row['patient_id']}_{row['slice_index']}_mask.tif"
        assert mask_file.is_file() and row["mask_uri"].endswith(mask_file.name)
        shutil.copyfile(truth[f"{row['patient_id']}_{row['slice_index']}.tif"], mask_file)
    assert main(["score", str(out), "--truth", str(synthetic_root), "--out", str(tmp_path / "perfect.json")]) == 0
    perfect = json.loads((tmp_path / "perfect.json").read_text())
    assert perfect["scored"] == len(rows) and perfect["unmatched"] == [] == perfect["missing"]
    assert set(perfect["metrics"]["patient_dice"].values()) == {1.0}
    assert perfect["metrics"]["detection"]["sensitivity"] == 1.0 == perfect["metrics"]["detection"]["specificity"]
    assert "mean patient Dice 1.0000" in capsys.readouterr().out

    tumour = next(pid for pid in sorted(perfect["metrics"]["patient_dice"])
                  if any(tifffile.imread(truth[f"{r['patient_id']}_{r['slice_index']}.tif"]).any()
                         for r in rows if r["patient_id"] == pid))
    for mask_file in (out / "masks" / tumour).glob("*_mask.tif"):
        tifffile.imwrite(mask_file, np.zeros((256, 256), np.uint8))
    assert main(["score", str(out), "--truth", str(synthetic_root), "--out", str(tmp_path / "emptied.json")]) == 0
    emptied = json.loads((tmp_path / "emptied.json").read_text())["metrics"]["patient_dice"]
    assert emptied[tumour] == 0.0 and all(v == 1.0 for p, v in emptied.items() if p != tumour)


def test_score_refuses_an_unfinished_output(tmp_path, synthetic_root, capsys):
    from brainseg_ray.cli import main

    assert main(["score", str(tmp_path), "--truth", str(synthetic_root)]) == 2
    assert "not a finished bulk segmentation" in capsys.readouterr().err
