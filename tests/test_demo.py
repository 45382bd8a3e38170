"""`brainseg demo` end to end on the session's Ray instance, shortened (6 patients of 4-6 slices,
1 epoch at 64 px): the summary keeps its table, and the Serve step is real: the app `brainseg
serve` builds comes up, one HTTP POST is answered as the bulk job answered that slice, and Serve is
down again."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from brainseg_ray.demo import REFERENCE_KEY, reference_on_synthetic, run_demo
from brainseg_ray.models.reference import REFERENCE_DIR, reference_model
from conftest import tiny_artifact

SHORT_TRAINING = dict(epochs=1, image_size=64)
# Fewer slices than the default 20-30 a patient: every step (the reference model's 256 px passes
# above all) runs over them, and the story is the same.
SHORT_PATIENTS = (4, 6)
KEYS_BEFORE_SERVE = [
    "synthetic patients", "slice files found / ingested / errors", "patients train/val/test", "training",
    "test patients' Dice (held out)", "segmented / errors", "dataset", "model", "training curves",
    "evaluation report", "masks and overlays", "step seconds", "seconds",
]
HTTP_CALL = re.compile(r"POST (?P<file>\S+\.tif) -> status (?P<status>\d+), area (?P<area>\d+) px, "
                       r"(?P<ms>\d+) ms, model (?P<version>\S+) \(same as the bulk job: (?P<bulk>\d+) px\)")


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    lines: list[str] = []
    summary = run_demo(out=str(out), patients=6, training=SHORT_TRAINING, log=lines.append,
                       slices_per_patient=SHORT_PATIENTS)
    return summary, out, lines


def test_summary_keeps_its_table_and_adds_the_serve_step(demo):
    summary, out, lines = demo
    assert [k for k in KEYS_BEFORE_SERVE if k not in summary] == []
    assert summary["synthetic patients"] == 6
    assert summary["model"] and (Path(summary["model"]) / "model.json").is_file()
    for key in ("endpoint", "web page", "HTTP call", "serve it again"):
        assert summary[key], key
    steps = summary["step seconds"]
    assert "bulk segmentation" in steps and "serve and one HTTP call" in steps
    assert any("serve and one HTTP call done" in line for line in lines)


def test_the_http_call_is_real_and_agrees_with_the_bulk_job(demo):
    summary, out, _ = demo
    endpoint = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/v1/segment", summary["endpoint"])
    assert endpoint, summary["endpoint"]
    assert summary["web page"].startswith(f"http://127.0.0.1:{endpoint.group(1)}/ ")

    call = HTTP_CALL.fullmatch(summary["HTTP call"])
    assert call, summary["HTTP call"]
    assert call["status"] == "200"
    version = json.loads((Path(summary["model"]) / "model.json").read_text())["version"]
    assert call["version"] == version
    # The slice sent is a held-out patient's, and the bulk job wrote the same area for it.
    rows = pq.read_table(out / "segmentation" / "results.parquet").to_pylist()
    row = next(r for r in rows if os.path.basename(r["source_uri"]) == call["file"])
    splits = json.loads((out / "split.json").read_text())["splits"]
    assert splits[row["patient_id"]] == "test"
    assert int(call["area"]) == int(call["bulk"]) == row["tumor_area_px"]
    assert int(call["ms"]) > 0


def test_serve_is_down_after_the_demo_and_the_command_brings_it_back(demo):
    from ray.serve.context import _get_global_client

    summary, _, _ = demo
    assert _get_global_client(raise_if_no_controller_running=False) is None
    port = int(re.search(r":(\d+)/", summary["endpoint"]).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the demo's endpoint still answers"
    assert summary["serve it again"] == f"brainseg serve --model {summary['model']}"


def _check_reference_line(line: str, output: Path) -> None:
    """The demo's reference step: the bulk job's masks of the 6 synthetic patients scored
    against their truth (mean, min, max), and every slice segmented."""
    found = re.search(r"synthetic patients (\d\.\d+) mean over (\d+) \(min (\d\.\d+), max (\d\.\d+)\)", line)
    assert found, line
    mean, patients, low, high = float(found[1]), int(found[2]), float(found[3]), float(found[4])
    assert patients == 6 and 0.0 <= low <= mean <= high <= 1.0
    assert "only informative" in line and line.endswith(f"-> {output}")
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["counts"]["ok"] == manifest["counts"]["found"] > 0


def test_reference_model_in_the_demo(demo):
    if reference_model() is None:
        pytest.skip(f"no reference model shipped in this checkout ({REFERENCE_DIR}/model.json absent): "
                    "test_reference_scoring_with_a_stand_in_model runs the step instead")
    summary, out, _ = demo
    _check_reference_line(summary[REFERENCE_KEY], out / "reference-segmentation")


@pytest.mark.skipif(reference_model() is not None,
                    reason="the shipped reference model runs this step in test_reference_model_in_the_demo")
def test_reference_scoring_with_a_stand_in_model(ray_local, synthetic_root, tmp_path):
    """Without a shipped reference model, the same step on a stand-in artifact."""
    model = tiny_artifact(tmp_path / "model")
    line = reference_on_synthetic(model, str(synthetic_root), str(tmp_path / "ref"))
    _check_reference_line(line, tmp_path / "ref")
