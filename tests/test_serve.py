"""The Serve endpoint as clients meet it: real HTTP on 127.0.0.1 against one app that
`brainseg serve` starts on the session's Ray instance, its model on (moto's) S3, a bearer token on.

The tests share that one app and run in file order: the load test scales the Segmenter to two
replicas, the kill test then takes one of them away."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from brainseg_ray.compat import ensure_torchvision_importable
from brainseg_ray.config import ConfigError, SegmenterConfig, SegmentJobConfig, ServeConfig
from brainseg_ray.dev_data import SHARED_KAGGLE_3M
from brainseg_ray.serve import settings
from brainseg_ray.serve.loadgen import run_load
from conftest import _free_port, tiny_artifact, upload_tree

ensure_torchvision_importable()

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("BRAINSEG_TEST_ARTIFACTS", REPO / "test-artifacts"))
TOKEN = f"test-{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALLOWED_ORIGIN = "http://viewer.test"
# Settings the app runs with here; the batch-job comparison uses the same segmenter settings.
SEGMENTER = {"precision": "fp32", "min_component_px": 3}
SERVE_OVERRIDES = ["cpus_per_replica=0.5",  # two replicas and a batch job fit in 2 CPUs
                   "autoscaling.min_replicas=1", "autoscaling.max_replicas=2",
                   "autoscaling.target_ongoing_requests=2", "autoscaling.upscale_delay_s=1",
                   f"cors_origins=[{ALLOWED_ORIGIN}]", "log_level=WARNING",
                   *(f"segmenter.{k}={v}" for k, v in SEGMENTER.items())]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_artifact(tmp_path_factory.mktemp("serve-model") / "model")


@pytest.fixture(scope="module")
def model_s3(s3_endpoint, model_dir) -> str:
    import boto3

    bucket = f"serve-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    upload_tree(Path(model_dir), f"s3://{bucket}/models/tiny")
    return f"s3://{bucket}/models/tiny"


@pytest.fixture(scope="module")
def server(ray_local, model_s3, tmp_path_factory):
    """`brainseg serve` in a subprocess, joined to the session's Ray; yields its base URL."""
    from ray import serve

    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {**os.environ, "BRAINSEG_API_TOKEN": TOKEN}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "brainseg_ray.cli", "serve", "--model", model_s3, "--host", "127.0.0.1",
               "--port", str(port), "--address", ray_local.get_runtime_context().gcs_address, *SERVE_OVERRIDES]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.time() + 240
        while "serve: http" not in log_path.read_text():
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"brainseg serve did not start (exit {process.poll()}):\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        serve.shutdown()  # the controller and proxy too: later tests get the CPUs back


def _tiff_bytes(image: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image)
    return buffer.getvalue()


def _png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def slice_tiff(synthetic_root) -> bytes:
    """A synthetic slice with a lesion, as its TIFF file."""
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    files = sorted(p for p in patient.glob("*.tif") if not p.stem.endswith("_mask"))
    return files[len(files) // 2].read_bytes()


def _post(server, body, headers=None, params="", **kw):
    return requests.post(f"{server}/v1/segment{params}", data=body, headers={**AUTH, **(headers or {})},
                         timeout=60, **kw)


# ------------------------------------------------------------------------------ settings


def test_serve_config_file_is_the_builders_args():
    cfg = settings.load(str(REPO / "serve_config.yaml"), ["segmenter.model=/m"])
    assert (cfg.segmenter.model, cfg.app_name, cfg.port, cfg.max_body_mb) == ("/m", "brainseg", 8000, 10.0)
    assert cfg.cors_origins == [] and ServeConfig().cors_origins == []  # CORS off unless configured
    from brainseg_ray.serve.app import app

    assert type(app({"segmenter": {"model": "/m"}})).__name__ == "Application"


def test_builder_args_from_the_serve_command_line_are_typed():
    cfg = settings.from_args({"model": "s3://b/m", "max_batch_size": "16", "autoscaling.max_replicas": "3",
                              "auth_token": "0123", "cors_origins": "[http://a.test]"})
    assert (cfg.segmenter.model, cfg.max_batch_size, cfg.autoscaling.max_replicas) == ("s3://b/m", 16, 3)
    assert cfg.auth_token == "0123" and cfg.cors_origins == ["http://a.test"]


@pytest.mark.parametrize("args,message", [
    ({"model": ""}, "needs a model artifact"),
    ({"model": "/m", "segmenter.largest_component_3d": True}, "whole stack"),
    ({"model": "/m", "max_body_mb": 0}, "max_body_mb"),
    ({"model": "/m", "nope": 1}, "unknown setting nope"),
])
def test_bad_serve_settings_are_named(args, message):
    with pytest.raises(ConfigError, match=message):
        settings.from_args(args)


def test_cli_refuses_a_missing_model_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "brainseg_ray.cli", "serve", "--model", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "brainseg serve: error: model artifact" in result.stderr and "no such directory" in result.stderr


# ------------------------------------------------------------------------------ the API


def test_health_is_open_and_ready(server):
    answer = requests.get(f"{server}/v1/health", timeout=30)
    assert answer.status_code == 200
    assert answer.json()["status"] == "ok" and answer.json()["model_loaded"] is True


def test_log_level_reaches_the_replicas(server, slice_tiff, ray_local):
    """log_level=WARNING: the replicas' log files get no INFO lines (no access line per request)."""
    assert _post(server, slice_tiff).status_code == 200
    serve_logs = Path(ray_local._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    replica_logs = sorted(serve_logs.glob("replica_brainseg_*.log"))
    assert replica_logs, sorted(p.name for p in serve_logs.iterdir())
    text = "".join(p.read_text() for p in replica_logs)
    assert " INFO " not in text and "POST /v1/segment" not in text, text[-2000:]


def test_model_metadata_and_openapi(server, model_dir):
    info = requests.get(f"{server}/v1/model", headers=AUTH, timeout=30).json()
    expected = json.loads((Path(model_dir) / "model.json").read_text())
    assert info["model_version"] == expected["version"] and info["artifact"]["weights_sha256"] == expected["weights_sha256"]
    assert info["serving"]["precision"] == "fp32" and info["serving"]["min_component_px"] == 3
    assert info["serving"]["backend"] == "onnxruntime"  # auto, on a CPU computing in float32
    spec = requests.get(f"{server}/openapi.json", headers=AUTH, timeout=30).json()
    assert {"/v1/segment", "/v1/health", "/v1/model"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]


def test_segment_multipart_and_raw_body_agree(server, slice_tiff):
    multipart = requests.post(f"{server}/v1/segment", files={"file": ("s.tif", slice_tiff, "image/tiff")},
                              headers=AUTH, timeout=60)
    raw = _post(server, slice_tiff, {"Content-Type": "image/tiff"})
    assert multipart.status_code == raw.status_code == 200
    a, b = multipart.json(), raw.json()
    for key in ("tumor_present", "tumor_area_px", "tumor_area_mm2", "bbox", "confidence", "model_version"):
        assert a[key] == b[key]
    assert a["input"] == {"format": "TIFF", "width": 256, "height": 256, "resized": False, "model_input": [256, 256]}
    assert a["warnings"] == [] and a["batch_size"] >= 1
    t = a["timings_ms"]
    assert set(t) == {"parse", "decode", "queue", "batch_wait", "forward", "postprocess", "inference", "return",
                      "encode", "total"}
    assert 0 < t["forward"] <= t["inference"] and t["total"] >= t["decode"] + t["inference"]


def test_include_mask_and_overlay_and_png_accept(server, slice_tiff):
    answer = _post(server, slice_tiff, params="?include=mask,overlay").json()
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))))
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"]))))
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}
    assert int((mask > 0).sum()) == answer["tumor_area_px"] and overlay.shape == (256, 256, 3)
    if answer["bbox"]:
        x0, y0, x1, y1 = answer["bbox"]
        assert int((mask[y0:y1, x0:x1] > 0).sum()) == answer["tumor_area_px"]
    png = _post(server, slice_tiff, {"Accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), overlay)
    assert png.headers["x-tumor-area-px"] == str(answer["tumor_area_px"])
    assert png.headers["x-model-version"] == answer["model_version"]


def test_other_sizes_and_formats_are_resized_and_said_so(server, synthetic_root):
    import tifffile

    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    image = tifffile.imread(sorted(patient.glob("*_1.tif"))[0])
    small = np.asarray(Image.fromarray(image).resize((128, 96)))
    answer = _post(server, _png_bytes(small), {"Content-Type": "image/png"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["input"] == {"format": "PNG", "width": 128, "height": 96, "resized": True, "model_input": [256, 256]}
    assert "resized from 128x96 to 256x256" in body["warnings"][0]
    jpeg = _post(server, _png_bytes(image, "JPEG"), {"Content-Type": "image/jpeg"})
    assert jpeg.status_code == 200 and jpeg.json()["input"]["format"] == "JPEG"


def _chunks(data: bytes, size: int = 1 << 20):
    for start in range(0, len(data), size):
        yield data[start:start + size]


BAD_INPUTS = {
    # name: (body, content type, expected status, words in the reason)
    "text": (b"hello", "text/plain", 415, "unsupported type text/plain"),
    "gif": (_png_bytes(np.zeros((8, 8), np.uint8), "GIF"), "image/gif", 415, "unsupported type GIF"),
    "bmp": (_png_bytes(np.zeros((8, 8, 3), np.uint8), "BMP"), "application/octet-stream", 415, "unsupported type BMP"),
    "json_around_png": (_png_bytes(np.zeros((8, 8, 3), np.uint8)), "application/json", 415, "Content-Type"),
    "not_png": (b"garbage bytes", "image/png", 400, "not a valid PNG"),
    "empty": (b"", "image/tiff", 400, "no image data"),
    "truncated_tiff": (_tiff_bytes(np.full((256, 256, 3), 7, np.uint8))[:300], "image/tiff", 400, "cannot decode TIFF"),
    "grey_png": (_png_bytes(np.zeros((256, 256), np.uint8)), "image/png", 400, "expected 3 channels, got 1"),
    "rgba_png": (_png_bytes(np.zeros((256, 256, 4), np.uint8)), "image/png", 400, "expected 3 channels, got 4"),
    "16_bit_tiff": (_tiff_bytes(np.zeros((256, 256, 3), np.uint16)), "image/tiff", 400, "expected 8-bit pixels"),
    "huge_png": (_png_bytes(np.zeros((5000, 5000), np.uint8)), "image/png", 400, "pixels are accepted"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_get_4xx_with_the_reason(server, name):
    body, content_type, status, words = BAD_INPUTS[name]
    answer = _post(server, body, {"Content-Type": content_type})
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]


def test_bad_requests_around_the_body(server, slice_tiff):
    unknown = _post(server, slice_tiff, params="?include=mask,heatmap")
    assert unknown.status_code == 400 and "unknown include heatmap" in unknown.json()["detail"]
    no_file = requests.post(f"{server}/v1/segment", data={"note": "x"}, files={"other": ("a", b"1"), "b": ("b", b"2")},
                            headers=AUTH, timeout=30)
    assert no_file.status_code == 400 and "field 'file'" in no_file.json()["detail"]
    big = os.urandom(11 * 1000 * 1000)  # over the default 10 MB
    declared = _post(server, big, {"Content-Type": "image/tiff"})
    assert declared.status_code == 413 and "10 MB" in declared.json()["detail"]
    streamed = _post(server, _chunks(big), {"Content-Type": "image/tiff"})  # chunked: no Content-Length
    assert streamed.status_code == 413
    assert _post(server, slice_tiff).status_code == 200  # and the server is none the worse


@pytest.mark.parametrize("method,path", [("GET", "/"), ("GET", "/v1/model"), ("GET", "/openapi.json"),
                                         ("POST", "/v1/segment"), ("GET", "/no/such/route")])
def test_every_route_but_health_needs_the_token(server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        answer = requests.request(method, f"{server}{path}", headers=headers, data=b"x", timeout=30)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.headers["www-authenticate"].startswith("Bearer")
    assert requests.get(f"{server}/v1/health", timeout=30).status_code == 200
    assert requests.get(f"{server}/", headers=AUTH, timeout=30).status_code == 200


def test_cors_only_for_configured_origins(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = requests.options(f"{server}/v1/segment", headers={"Origin": ALLOWED_ORIGIN, **preflight}, timeout=30)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = requests.options(f"{server}/v1/segment", headers={"Origin": "http://evil.test", **preflight}, timeout=30)
    assert "access-control-allow-origin" not in other.headers
    refused = requests.get(f"{server}/v1/model", headers={"Origin": ALLOWED_ORIGIN}, timeout=30)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


# ------------------------------------------------------------------ the same answers as the batch job


@pytest.mark.shared_data
def test_answers_equal_the_batch_jobs_for_real_slices(server, shared_root, model_dir, tmp_path):
    import pyarrow.parquet as pq
    import tifffile

    from brainseg_ray.batch import segment

    patient = sorted(p for p in shared_root.iterdir() if p.is_dir())[0]
    src = tmp_path / "kaggle_3m"
    src.mkdir()
    (src / patient.name).symlink_to(patient, target_is_directory=True)
    out = tmp_path / "out"
    job = SegmentJobConfig(input=str(src), output=str(out), cpus_per_actor=0.5,
                           segmenter=SegmenterConfig(model=model_dir, **SEGMENTER))
    segment(job)
    rows = {r["slice_index"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert rows and all(r["status"] == "ok" for r in rows.values())
    largest = max(rows.values(), key=lambda r: r["tumor_area_px"])["slice_index"]
    for index in sorted({1, largest, max(rows)}):
        row = rows[index]
        answer = _post(server, (patient / f"{patient.name}_{index}.tif").read_bytes(),
                       {"Content-Type": "image/tiff"}, params="?include=mask,overlay")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        for key in ("tumor_present", "tumor_area_px", "tumor_area_mm2", "bbox", "model_version"):
            assert body[key] == row[key], (index, key)
        assert body["confidence"] == pytest.approx(row["confidence"], rel=1e-5, abs=1e-6)
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
        assert np.array_equal(mask, tifffile.imread(row["mask_uri"]))
        overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))))
        assert np.array_equal(overlay, np.asarray(Image.open(row["overlay_uri"])))


# ------------------------------------------------------------------------------ load and failure


def _segmenter_replicas() -> Counter:
    from ray import serve

    app = serve.status().applications.get("brainseg")
    if app is None or "Segmenter" not in app.deployments:
        return Counter()
    return Counter({str(state.value if hasattr(state, "value") else state): n
                    for state, n in app.deployments["Segmenter"].replica_states.items()})


def _watch_replicas(stop: threading.Event, seen: list) -> None:
    while not stop.is_set():
        seen.append(_segmenter_replicas())
        stop.wait(1.0)


def _second_replica_asked_for(seen: list) -> bool:
    return any(s.get("RUNNING", 0) + s.get("STARTING", 0) >= 2 for s in seen + [_segmenter_replicas()])


def _add_load(total, more) -> None:
    total.statuses.update(more.statuses)
    total.latencies_ms.extend(more.latencies_ms)
    total.problems.extend(more.problems)
    total.duration_s += more.duration_s


@pytest.fixture(scope="module")
def load_run(server, slice_tiff):
    """32 clients for 20 s or more, every answer checked, the Segmenter's replicas watched meanwhile
    (10 s were too short for the autoscaler's averaged request counts to add a replica)."""
    batch_sizes: list[int] = []

    def check(status: int, body: bytes) -> str | None:
        if status != 200:
            return f"status {status}: {body[:200]!r}"
        try:
            answer = json.loads(body)
            assert isinstance(answer["tumor_present"], bool) and isinstance(answer["tumor_area_px"], int)
            assert answer["bbox"] is None or len(answer["bbox"]) == 4
            assert 0.0 <= answer["confidence"] <= 1.0 and answer["model_version"]
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            return f"malformed answer ({type(exc).__name__}): {body[:200]!r}"
        batch_sizes.append(answer["batch_size"])
        return None

    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=_watch_replicas, args=(stop, seen), daemon=True)
    watcher.start()
    url, headers = f"{server}/v1/segment", {**AUTH, "Content-Type": "image/tiff"}
    result = run_load(url, slice_tiff, headers, clients=32, duration_s=20, check=check)
    # On a busy machine the autoscaler's averaged counts can lag past 20 s: keep the load on, in
    # 5-s spells, until a second replica is asked for or 60 s have passed in all.
    deadline = time.time() + 40
    while not _second_replica_asked_for(seen) and time.time() < deadline:
        _add_load(result, run_load(url, slice_tiff, headers, clients=32, duration_s=5, check=check))
    # A replica the autoscaler started under load may still be loading its model: give it time.
    deadline = time.time() + 60
    while _segmenter_replicas().get("RUNNING", 0) < 2 and seen and max(s.get("STARTING", 0) for s in seen) \
            and time.time() < deadline:
        time.sleep(1)
    stop.set()
    watcher.join()
    return result, batch_sizes, seen + [_segmenter_replicas()]


def test_32_clients_for_20s_get_only_well_formed_answers(load_run):
    result, batch_sizes, _ = load_run
    print(f"load: {result.requests} requests in {result.duration_s:.1f} s, {result.rps:.1f}/s, "
          f"p50 {result.percentile_ms(50):.0f} ms, p99 {result.percentile_ms(99):.0f} ms, "
          f"batch sizes {sorted(Counter(batch_sizes).items())}")
    assert result.requests > 100
    assert result.server_errors == 0 and result.statuses == {200: result.requests}, result.problems[:5]
    assert result.problems == []
    # Requests that queue while a model runs share its next pass (each pass of b slices answered b
    # requests). This model runs in milliseconds, so the ingress rather than the model sets the pace:
    # about 2.5 slices per pass here; bench/serve.py shows the shipped model's.
    passes = sum(1 / b for b in batch_sizes)
    assert len(batch_sizes) / passes >= 2, sorted(Counter(batch_sizes).items())


def test_autoscaling_from_one_to_two_replicas_under_load(load_run):
    _, _, seen = load_run
    assert seen[0].get("RUNNING", 0) == 1, seen[:3]
    assert max(s.get("RUNNING", 0) for s in seen) == 2, seen[-5:]


def test_metrics_in_prometheus_format(load_run, ray_local):
    port = ray_local.nodes()[0]["MetricsExportPort"]
    wanted = ("ray_brainseg_requests_total", "ray_brainseg_request_latency_ms_bucket",
              "ray_brainseg_batch_size_bucket", "ray_brainseg_slices_total", "ray_brainseg_tumor_positive_rate")
    answered = r'^ray_brainseg_requests_total\{[^}]*endpoint="/v1/segment"[^}]*status="200"[^}]*\} (\S+)'
    # Ray exports every few seconds: wait until the load test's answers are all counted.
    deadline, text, counted = time.time() + 60, "", 0.0
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        counted = sum(float(m.group(1)) for m in re.finditer(answered, text, re.M))
        if all(name in text for name in wanted) and counted >= load_run[0].statuses[200]:
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported: {missing}"
    assert counted >= load_run[0].statuses[200]
    assert re.search(r'^ray_brainseg_requests_total\{[^}]*status="401"', text, re.M)


def _segmenter_replica_names(ray) -> set[str]:
    """Live Segmenter replicas, by their actor names in Serve's namespace."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::brainseg#Segmenter#")}


def test_a_replica_killed_under_load_is_replaced_and_requests_succeed(server, slice_tiff, load_run, ray_local):
    replicas = sorted(_segmenter_replica_names(ray_local))
    assert replicas, "no Segmenter replica alive"
    outcome = {}
    loader = threading.Thread(target=lambda: outcome.setdefault("load", run_load(
        f"{server}/v1/segment", slice_tiff, {**AUTH, "Content-Type": "image/tiff"}, clients=8, duration_s=8)))
    loader.start()
    time.sleep(3)
    killed = replicas[0]
    ray_local.kill(ray_local.get_actor(killed, namespace="serve"), no_restart=True)
    loader.join()
    during = outcome["load"]
    # In-flight requests on the dead replica are retried on another or answered 503, never 500.
    assert set(during.statuses) <= {200, 503} and during.statuses[200] > 0, (during.statuses, during.problems[:3])
    deadline, alive = time.time() + 120, set()
    while time.time() < deadline:
        alive = _segmenter_replica_names(ray_local)
        if alive - {killed} and _segmenter_replicas().get("RUNNING", 0) >= 1 \
                and requests.get(f"{server}/v1/health", timeout=10).status_code == 200:
            break
        time.sleep(1)
    assert killed not in alive and alive, alive
    after = [_post(server, slice_tiff, {"Content-Type": "image/tiff"}).status_code for _ in range(10)]
    assert after == [200] * 10


# ------------------------------------------------------------------------------ the web page


def _chromium():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are required under CI (make browser installs them)")
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver, or make browser)")
    return chromium, driver


def test_web_page_uploads_a_slice_and_shows_overlay_and_numbers(server, synthetic_root, tmp_path):
    chromium, chromedriver = _chromium()
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    source = SHARED_KAGGLE_3M if SHARED_KAGGLE_3M.is_dir() else synthetic_root
    patients = sorted(p for p in source.iterdir() if p.is_dir())
    slice_path = max((p for p in patients[0].glob("*_mask.tif")), key=lambda p: p.stat().st_size)
    slice_path = slice_path.with_name(slice_path.name.replace("_mask", ""))  # the slice of the largest mask file

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Headless, and nothing that would try to reach Google's servers.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-default-apps", "--disable-extensions",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1100,820"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        # The page and its API calls need the token, as a reverse proxy in front would add it.
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": AUTH})
        browser.get(f"{server}/")
        assert browser.title == "brainseg-ray: segment a slice"
        browser.find_element(By.ID, "file").send_keys(str(slice_path))
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.ID, "numbers").get_attribute("data-state") in ("done", "error"))
        status = browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "numbers").get_attribute("data-state") == "done", status
        sizes = browser.execute_script(
            "return ['overlay', 'mask'].map((id) => document.getElementById(id).naturalWidth)")
        assert sizes == [256, 256]
        assert browser.find_element(By.ID, "n-present").text in ("yes", "no")
        assert re.match(r"\d+ px \(", browser.find_element(By.ID, "n-area").text)
        assert browser.find_element(By.ID, "n-file").text == slice_path.name
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))
    finally:
        browser.quit()
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 10_000


def test_the_shipped_reference_model_is_the_default():
    from brainseg_ray.config import SegmentJobConfig

    assert settings.from_args({}).segmenter.model == "reference" == SegmentJobConfig().segmenter.model
