"""`brainseg demo`: the whole story on the embedded default, with nothing but the repository.

Synthetic patients in the kaggle_3m layout -> Ray Data ingest -> patient-level split -> a short Ray
Train run -> evaluation on the held-out test patients -> bulk segmentation of every slice -> the
Serve endpoint up, one real HTTP call, Serve down -> a summary table of what was made, how well and
how fast, and where it is. When the package ships a reference model, it bulk-segments the synthetic
patients too (an informative figure only: it was trained on real data).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
import urllib.error
import urllib.request

from brainseg_ray.config import (
    EvaluateConfig,
    IngestConfig,
    RayConfig,
    SegmenterConfig,
    SegmentJobConfig,
    TrainConfig,
)
from brainseg_ray.data.synthetic import write_synthetic_dataset
from brainseg_ray.runtime import init_ray

# A small plain U-Net at 128 px learns the synthetic lesions in a few epochs on two CPU cores
# (the suite's learning test trains the same and asserts Dice >= 0.8 on held-out patients).
DEMO_TRAINING = dict(model="unet", base_filters=8, image_size=128, batch_size=8, lr=3e-3, epochs=8)
REFERENCE_KEY = "reference model (informative)"
DEMO_APP = "brainseg-demo"


def run_demo(out: str = "demo-out", patients: int = 12, seed: int = 0, ray: RayConfig | None = None,
             log=print, training: dict | None = None, verbose: bool = False,
             slices_per_patient: tuple[int, int] | None = None) -> dict:
    """Run the story and return the summary table (key -> text). `training` overrides DEMO_TRAINING;
    `slices_per_patient` (min, max) the synthetic data's default."""
    from brainseg_ray.batch import segment
    from brainseg_ray.data.ingest import ingest
    from brainseg_ray.data.split import assign_splits
    from brainseg_ray.data.tables import tumour_slices_by_patient
    from brainseg_ray.evaluate.run import evaluate
    from brainseg_ray.models.reference import reference_model
    from brainseg_ray.train.trainer import train

    started = time.time()
    timings: dict[str, float] = {}
    training = {**DEMO_TRAINING, **(training or {})}
    # Absolute: Ray Train's workers run in a directory of their own, where a relative path (the
    # default demo-out) would put the run's history somewhere else than its checkpoints.
    out = os.path.abspath(out)

    def step(name: str, since: float) -> float:
        now = time.time()
        timings[name] = round(now - since, 1)
        log(f"demo: {name} done in {timings[name]} s")
        return now

    shape = {"slices_per_patient": slices_per_patient} if slices_per_patient else {}
    synth = write_synthetic_dataset(os.path.join(out, "synthetic"), patients=patients, seed=seed, **shape)
    # The demo's own lines and its table are what a person reads; Ray's workers' per-epoch lines and
    # Ray Data's progress only with verbose.
    ray = ray or RayConfig(log_to_driver=verbose)
    init_ray(ray)
    if not verbose:  # after init: Ray Data sets up its own logging when it starts
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)
    t = step("synthetic data", started)

    ingested = ingest(IngestConfig(source=synth.root, out=os.path.join(out, "dataset")))
    splits = assign_splits(tumour_slices_by_patient(ingested.out), (0.67, 0.165, 0.165), seed=seed)
    split_file = os.path.join(out, "split.json")
    with open(split_file, "w") as f:
        json.dump({"splits": splits}, f, indent=1, sort_keys=True)
    per_split = {name: sum(1 for s in splits.values() if s == name) for name in ("train", "val", "test")}
    t = step("ingest and split", t)

    trained = train(TrainConfig(data=ingested.out, out=os.path.join(out, "run"), split_file=split_file,
                                ray=ray, **training))
    t = step("training", t)

    evaluated = evaluate(EvaluateConfig(models=[trained.model_uri], data=ingested.out, out=os.path.join(out, "report"),
                                        split_file=split_file, split="test"))
    test_metrics = evaluated.report["models"][0]["metrics"]
    t = step("evaluation", t)

    segment_started = time.time()
    segmented = segment(SegmentJobConfig(input=synth.root, output=os.path.join(out, "segmentation"),
                                         segmenter=SegmenterConfig(model=trained.model_uri)))
    segment_seconds = time.time() - segment_started
    t = step("bulk segmentation", t)

    reference = reference_model()
    reference_line = None
    if reference is not None:
        reference_line = reference_on_synthetic(reference, synth.root, os.path.join(out, "reference-segmentation"))
        t = step("reference model", t)

    bulk_row = _slice_to_send(segmented.output, {p for p, s in splits.items() if s == "test"})
    served = serve_and_call(trained.model_uri, bulk_row["source_uri"], log=log)
    t = step("serve and one HTTP call", t)

    call = served["call"]
    agrees = (call["status"] == 200 and call["tumor_area_px"] == bulk_row["tumor_area_px"]
              and call["model_version"] == bulk_row["model_version"])
    summary = {
        "synthetic patients": synth.patients,
        "slice files found / ingested / errors": f"{ingested.found} / {ingested.written} / {ingested.errors}",
        "patients train/val/test": "/".join(str(n) for n in per_split.values()),
        "training": f"{trained.epochs_run} epochs of {training['model']} at {training['image_size']} px, "
                    f"best validation Dice {trained.best_val_patient_dice:.3f} (epoch {trained.best_epoch})",
        "test patients' Dice (held out)": f"{test_metrics['patient_dice_mean']:.3f} "
                                          f"(sensitivity {test_metrics['detection']['sensitivity']:.3f})",
        "segmented / errors": f"{segmented.ok} / {segmented.errors} of {segmented.found} "
                              f"({segmented.found / segment_seconds:.1f} slices/s)",
    }
    if reference_line is not None:
        summary[REFERENCE_KEY] = reference_line
    summary.update({
        "HTTP call": (f"POST {os.path.basename(bulk_row['source_uri'])} -> status {call['status']}, "
                      f"area {call['tumor_area_px']} px, {call['latency_ms']:.0f} ms, model {call['model_version']} "
                      f"({'same as' if agrees else 'DIFFERS from'} the bulk job: "
                      f"{bulk_row['tumor_area_px']} px)"),
        "endpoint": served["endpoint"],
        "web page": f"{served['page']} (served during the demo; Serve is stopped now)",
        "serve it again": f"brainseg serve --model {shlex.quote(trained.model_uri)}",
        "dataset": ingested.out,
        "model": trained.model_uri,
        "training curves": os.path.join(trained.out, "curves.png"),
        "evaluation report": os.path.join(evaluated.out, "report.md"),
        "masks and overlays": f"{segmented.output} (masks/, overlays/, results.parquet, manifest.json)",
        "step seconds": ", ".join(f"{k} {v}" for k, v in timings.items()),
        "seconds": round(time.time() - started, 1),
    })
    return summary


def _slice_to_send(segmentation: str, test_patients: set[str]) -> dict:
    """The bulk job's row for the slice the HTTP call sends: a held-out patient's slice with the
    largest lesion found (any segmented slice when there is none)."""
    import pyarrow.parquet as pq

    from brainseg_ray.batch import RESULTS_FILE

    rows = [r for r in pq.read_table(os.path.join(segmentation, RESULTS_FILE)).to_pylist() if r["status"] == "ok"]
    held_out = [r for r in rows if r["patient_id"] in test_patients] or rows
    return max(held_out, key=lambda r: (r["tumor_area_px"], r["patient_id"], -r["slice_index"]))


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _a_free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_and_call(model_uri: str, slice_path: str, log=print) -> dict:
    """Start the endpoint as `brainseg serve --model MODEL` does (serve.app.start on this process's
    Ray instance, 127.0.0.1, port 8000 or a free one), POST one slice to /v1/segment, then take
    Serve down again (only the demo's application when Serve was already running).

    Returns {"endpoint", "page", "call": {"status", "tumor_area_px", "model_version",
    "latency_ms", "body"}}."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from brainseg_ray.serve import settings
    from brainseg_ray.serve.app import start

    cfg = settings.load(model=model_uri)
    cfg.app_name = DEMO_APP  # on a shared Serve instance, never replaces (or deletes) someone's app
    cfg.log_level = "WARNING"  # the demo prints its own summary; Serve's access lines would bury it
    if not _port_free(cfg.host, cfg.port):
        cfg.port = _a_free_port(cfg.host)
    # One replica must fit the instance (the default asks 2 CPUs; the demo may run on fewer).
    cfg.cpus_per_replica = min(cfg.cpus_per_replica, float(ray.cluster_resources().get("CPU", 1.0)))
    serve_was_running = _get_global_client(raise_if_no_controller_running=False) is not None
    try:
        page = start(cfg)
        endpoint = page + "v1/segment"
        log(f"demo: serving {page} ; POST {endpoint}")
        headers = {"Content-Type": "image/tiff", "Accept": "application/json"}
        token = settings.resolve_token(cfg)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        with open(slice_path, "rb") as f:
            request = urllib.request.Request(endpoint, data=f.read(), headers=headers, method="POST")
        sent = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, body = response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            status, body = exc.code, {"error": exc.read().decode("utf-8", "replace")}
        latency_ms = (time.perf_counter() - sent) * 1000
    finally:
        if serve_was_running:
            serve.delete(cfg.app_name)
        else:
            serve.shutdown()
    return {"endpoint": endpoint, "page": page,
            "call": {"status": status, "tumor_area_px": body.get("tumor_area_px"),
                     "model_version": body.get("model_version"), "latency_ms": latency_ms, "body": body}}


def reference_on_synthetic(reference: str, synthetic_root: str, output: str) -> str:
    """Bulk-segment the synthetic patients with the shipped reference model and score its masks
    against the synthetic truth: per-patient 3-D Dice (mean, min, max), throughput, output."""
    from brainseg_ray.batch import segment
    from brainseg_ray.evaluate.score_masks import score_masks

    started = time.time()
    result = segment(SegmentJobConfig(input=synthetic_root, output=output, segmenter=SegmenterConfig(model=reference)))
    seconds = time.time() - started
    dices = list(score_masks(output, synthetic_root).metrics["patient_dice"].values())
    version = (result.manifest or {}).get("model", {}).get("version", "")
    return (f"patient Dice on the synthetic patients {sum(dices) / len(dices):.3f} mean over {len(dices)} "
            f"(min {min(dices):.3f}, max {max(dices):.3f}); trained on real scans, so only informative here; "
            f"model {version}, {result.found / seconds:.1f} slices/s -> {output}")


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    print("brainseg demo summary")
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")
