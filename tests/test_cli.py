"""The `brainseg` command as a user runs it: a subprocess, its summary line, its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BRAINSEG = [sys.executable, "-m", "brainseg_ray.cli"]


def run(*args, timeout=300):
    return subprocess.run([*BRAINSEG, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ADDRESS": ""})


def test_synth_then_ingest_prints_summaries(ray_local, tmp_path):
    synth = run("synth", "--out", str(tmp_path / "syn"), "--patients", "2", "min_slices=4", "max_slices=5")
    assert synth.returncode == 0, synth.stderr
    assert synth.stdout.startswith("synth: 2 patients")
    # On the session's Ray, as a user with Ray running would (a Ray start less); the resume test in
    # test_train.py runs the command on a Ray of its own.
    address = ray_local.get_runtime_context().gcs_address
    ingest = run("ingest", str(tmp_path / "syn" / "kaggle_3m"), "--out", str(tmp_path / "ds"), "--address", address)
    assert ingest.returncode == 0, ingest.stderr
    last = ingest.stdout.strip().splitlines()[-1]
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    n = manifest["counts"]["files_found"]
    assert 8 <= n <= 10
    assert last == f"ingest: {n} slice files found, {n} slices written, 0 errors -> {tmp_path / 'ds'}"

    split = run("split", str(tmp_path / "ds"), "--out", str(tmp_path / "split.json"), "--fractions", "0.5,0.5,0")
    assert split.returncode == 0, split.stderr
    assert sorted(json.loads((tmp_path / "split.json").read_text())["splits"].values()) == ["train", "val"]

    # One round of cross-validation: fold 1 of 2 is the test split, the other fold trains.
    cv = run("split", str(tmp_path / "ds"), "--out", str(tmp_path / "cv.json"), "--folds", "2", "--test-fold", "1",
             "--fractions", "1,0,0")
    assert cv.returncode == 0, cv.stderr
    record = json.loads((tmp_path / "cv.json").read_text())
    assert record["test_fold"] == 1 and sorted(record["splits"].values()) == ["test", "train"]
    assert [p for p, s in record["splits"].items() if s == "test"] == [p for p, f in record["folds"].items() if f == 1]
    from brainseg_ray.cli import main

    assert main(["split", str(tmp_path / "ds"), "--out", str(tmp_path / "x.json"), "--folds", "2", "--test-fold", "1",
                 "--fractions", "0.5,0.25,0.25"]) == 2


@pytest.mark.parametrize("args,message", [
    (["ingest", "/nonexistent/data", "--out", "/tmp/x"], "/nonexistent/data: no such folder"),
    (["ingest", "/tmp", "--out", "/tmp/x", "no_such_setting=1"], "unknown setting no_such_setting"),
    (["ingest", "/tmp", "--out", "/tmp/x", "slices_per_task=many"], "slices_per_task: expected int"),
    (["ingest", "gs://bucket/x", "--out", "/tmp/x"], "unsupported URI scheme"),
])
def test_user_mistakes_get_one_clear_line_not_a_traceback(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
