"""The Serve endpoint against a plain single-process app, one run, the same model and slice:

    .venv/bin/python bench/serve.py [--model ARTIFACT | --arch unet-efficientnet-lite2] [--duration 20]
                                    [--config serve_config.yaml] [key=value ...]

(a) Serve: serve_config.yaml's application (its args, then key=value overrides) on a local Ray
    instance: the FastAPI ingress, the Segmenter deployment with its batcher and autoscaling.
(b) plain: one uvicorn process with a FastAPI app whose sync route (run in FastAPI's thread pool)
    decodes the upload and runs the PyTorch model in fp32, one request at a time per thread: the
    seeds' design.

Each is driven by 1 and then 8 concurrent keep-alive clients posting the same slice as a
multipart upload, after a warm-up of each at that concurrency. Both run at once and take turns
(--rounds per concurrency), so a drift in the shared machine's speed hits both alike; the plain
app's figures therefore include Ray's idle processes on the same CPUs. Every figure is printed
next to its baseline with the ratio. Serve's answers carry their stage timings: at 1 client the
server's own overhead (server_overhead_ms_p50: the client's p50 less the median forward pass) and
at 8 clients the mean slices per forward pass (mean_batch_size_8_clients) are reported too. The last
line is one JSON object. Without --model a randomly initialised artifact of --arch is written
(speed does not depend on the weights).
"""

# No `from __future__ import annotations`: FastAPI reads the plain app's route annotations at run time.
import argparse
import json
import os
import statistics
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from brainseg_ray.dev_data import SHARED_KAGGLE_3M

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "brainsegbenchboundary"
CLIENTS = (1, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(args, workdir: str) -> str:
    from common import model_or_untrained  # bench/ is on sys.path when a bench script runs

    return model_or_untrained(args.model, args.arch, workdir)


def _slice(workdir: str) -> tuple[str, bytes]:
    """A real slice with a lesion when the shared data is there, else a synthetic one."""
    if SHARED_KAGGLE_3M.is_dir():
        patient = sorted(p for p in SHARED_KAGGLE_3M.iterdir() if p.is_dir())[0]
        mask = max(patient.glob("*_mask.tif"), key=lambda p: p.stat().st_size)
        path = mask.with_name(mask.name.replace("_mask", ""))
        return str(path), path.read_bytes()
    from brainseg_ray.data.synthetic import write_synthetic_dataset

    root = Path(write_synthetic_dataset(os.path.join(workdir, "synth"), patients=1, seed=1).root)
    path = sorted(p for p in root.rglob("*.tif") if not p.stem.endswith("_mask"))[0]
    return str(path), path.read_bytes()


def _multipart(name: str, data: bytes) -> bytes:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{Path(name).name}\"\r\n"
            "Content-Type: image/tiff\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


# ------------------------------------------------------------------------------ (b) the plain app


def plain_app(model_uri: str):
    """The baseline: FastAPI + PyTorch fp32 in one process, no batching, no Ray."""
    import io

    import numpy as np
    import tifffile
    import torch
    from fastapi import FastAPI, File, UploadFile

    from brainseg_ray.models.artifact import load_artifact
    from brainseg_ray.models.inputs import images_to_tensor, logits_to_probabilities

    artifact = load_artifact(model_uri)
    model, meta = artifact.model.eval(), artifact.metadata
    app = FastAPI()

    @app.post("/v1/segment")
    def segment(file: UploadFile = File(...)):
        image = np.asarray(tifffile.imread(io.BytesIO(file.file.read())))[None]
        with torch.inference_mode():
            x = images_to_tensor(image, meta["normalisation"], meta["input"]["size"])
            prob = logits_to_probabilities(model(x), image.shape[1], image.shape[2])[0].numpy()
        mask = prob > meta["threshold"]
        area = int(mask.sum())
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1] if area else None
        return {"tumor_present": area > 0, "tumor_area_px": area, "bbox": bbox,
                "confidence": float(prob[mask].mean()) if area else 1.0 - float(prob.max()),
                "model_version": meta["version"]}

    return app


def _run_plain(model_uri: str, port: int) -> None:
    import uvicorn

    from brainseg_ray.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    uvicorn.run(plain_app(model_uri), host="127.0.0.1", port=port, log_level="warning", workers=1)


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the plain app exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout_s} s")


# ------------------------------------------------------------------------------ measuring


def measure(urls: dict[str, str], body: bytes, duration_s: float, warmup_s: float, rounds: int) -> dict:
    """{name: {clients: figures}}: at each concurrency, after a warm-up of each app, the apps take
    turns for `rounds` rounds of duration_s / rounds, so a drift in the machine's speed hits both."""
    from brainseg_ray.serve.loadgen import LoadResult, run_load

    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    figures: dict = {name: {} for name in urls}
    answers: list[dict] = []  # Serve's measured answers at this concurrency

    def keep(status: int, body: bytes) -> None:
        if status == 200:
            answer = json.loads(body)
            if "timings_ms" in answer:
                answers.append(answer)

    for clients in CLIENTS:
        for url in urls.values():
            run_load(url, body, headers, clients=clients, duration_s=warmup_s)
        totals = {name: LoadResult(clients=clients, duration_s=0.0) for name in urls}
        answers.clear()
        for _ in range(rounds):
            for name, url in urls.items():
                result = run_load(url, body, headers, clients=clients, duration_s=duration_s / rounds,
                                  check=keep if name == "serve" else None)
                if set(result.statuses) != {200}:
                    raise RuntimeError(f"{name}: answers other than 200 at {clients} clients: "
                                       f"{dict(result.statuses)} {result.problems[:3]}")
                total = totals[name]
                total.statuses.update(result.statuses)
                total.latencies_ms.extend(result.latencies_ms)
                total.duration_s += result.duration_s
        for name, total in totals.items():
            figures[name][clients] = {"rps": round(total.rps, 2), "p50_ms": round(total.percentile_ms(50), 1),
                                      "p99_ms": round(total.percentile_ms(99), 1), "requests": total.requests}
        if answers:
            passes = sum(1 / a["batch_size"] for a in answers)  # a pass of b slices answered b requests
            figures["serve"][clients].update(
                forward_ms_p50=round(statistics.median(a["timings_ms"]["forward"] for a in answers), 1),
                mean_batch_size=round(len(answers) / passes, 2),
                stages_ms_p50={k: round(statistics.median(a["timings_ms"][k] for a in answers), 2)
                               for k in answers[0]["timings_ms"]})
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--arch", default="unet-efficientnet-lite2", help="the shipped model's architecture")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per concurrency")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up of each app per concurrency")
    parser.add_argument("--rounds", type=int, default=2, help="turns each app takes per concurrency")
    parser.add_argument("--config", default=str(REPO / "serve_config.yaml"))
    parser.add_argument("--plain-app", help=argparse.SUPPRESS)  # internal: run the baseline server
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.plain_app:
        _run_plain(args.plain_app, args.port)
        return 0

    from brainseg_ray.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from brainseg_ray.serve import settings

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model = _model(args, tmp)
        slice_name, data = _slice(tmp)
        body = _multipart(slice_name, data)

        port = _free_port()
        plain = subprocess.Popen([sys.executable, __file__, "--plain-app", model, "--port", str(port)])
        try:
            _wait_ready(f"http://127.0.0.1:{port}/openapi.json", plain)
            from ray import serve

            from brainseg_ray.runtime import init_ray
            from brainseg_ray.serve.app import start

            cfg = settings.load(args.config, [f"segmenter.model={model}", *overrides], port=_free_port())
            # One machine: no more replicas than its CPUs hold (more would wait for a node forever).
            fits = max(1, int((os.cpu_count() or 1) // max(cfg.cpus_per_replica, 1e-9)))
            cfg.autoscaling.max_replicas = min(cfg.autoscaling.max_replicas, fits)
            cfg.autoscaling.min_replicas = min(cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas)
            os.environ.pop(cfg.auth_token_env, None)  # no token: the plain app has none either
            init_ray(cfg.ray)
            url = start(cfg)
            with urllib.request.urlopen(f"{url}v1/model", timeout=30) as response:
                serving = json.load(response)["serving"]  # what the replicas resolved (backend, precision)
            try:
                figures = measure({"serve": f"{url}v1/segment", "plain": f"http://127.0.0.1:{port}/v1/segment"},
                                  body, args.duration, args.warmup, args.rounds)
            finally:
                serve.shutdown()
        finally:
            plain.terminate()
            plain.wait(30)
    ours, base = figures["serve"], figures["plain"]

    print(f"bench/serve.py: model {args.model or args.arch}, slice {Path(slice_name).name}, {os.cpu_count()} CPUs, "
          f"{args.duration:g} s per figure; serve: max_batch_size {cfg.max_batch_size}, batch_wait_timeout_s "
          f"{cfg.batch_wait_timeout_s}, replicas {cfg.autoscaling.min_replicas}-{cfg.autoscaling.max_replicas} x "
          f"{cfg.cpus_per_replica:g} CPU, precision {serving['precision']}, backend {serving['backend']}")
    for clients in CLIENTS:
        s, b = ours[clients], base[clients]
        print(f"{clients} client{'s' if clients > 1 else ' '}: requests/s  serve {s['rps']:8.2f}  plain {b['rps']:8.2f}"
              f"  ratio {s['rps'] / b['rps']:.3f}")
        for key in ("p50_ms", "p99_ms"):
            print(f"{clients} client{'s' if clients > 1 else ' '}: {key[:3]} ms    serve {s[key]:8.1f}  plain {b[key]:8.1f}"
                  f"  ratio {s[key] / b[key]:.3f}  delta {s[key] - b[key]:+.1f} ms")
    overhead = ours[1]["p50_ms"] - ours[1]["forward_ms_p50"]
    print(f"1 client : server overhead (p50 less the forward pass) {overhead:.1f} ms; stages p50 "
          f"{ours[1]['stages_ms_p50']}")
    print(f"8 clients: mean slices per forward pass {ours[8]['mean_batch_size']:.2f}; stages p50 {ours[8]['stages_ms_p50']}")
    print(json.dumps({"serve": {str(c): v for c, v in ours.items()}, "plain": {str(c): v for c, v in base.items()},
                      "server_overhead_ms_p50": round(overhead, 1),
                      "mean_batch_size_8_clients": ours[8]["mean_batch_size"],
                      "backend": serving["backend"], "precision": serving["precision"],
                      "rps_ratio_8_clients": round(ours[8]["rps"] / base[8]["rps"], 3),
                      "p50_delta_ms_1_client": round(ours[1]["p50_ms"] - base[1]["p50_ms"], 1),
                      "model": args.model or args.arch, "cpus": os.cpu_count(), "duration_s": args.duration,
                      "max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
                      "replicas": [cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas],
                      "cpus_per_replica": cfg.cpus_per_replica}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
