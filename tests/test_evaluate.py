"""The evaluate job's plumbing on the synthetic dataset: models on an explicit S3 endpoint, and
its GPU setting kept as given. (Its figures are checked in test_train.py, on a trained model.)"""

from __future__ import annotations

import json


def test_explicit_s3_model_and_use_gpu_false(synthetic_dataset, explicit_s3_model, tmp_path, monkeypatch):
    """One evaluate run checks two things (and that auto ran ONNX Runtime, as the segment job would).

    `brainseg evaluate --s3-endpoint URL` with an s3:// model: the driver's load (and the scoring
    actors') go through the job's S3 options, not the AWS environment.

    use_gpu=false is never a GPU, also where one is visible: the job used to pass
    `cfg.use_gpu or None`, turning false into "a GPU when one is visible". The driver is told here
    that a GPU is visible; its Segmenter (the gallery's) must stay on the CPU, where before it
    moved the model to CUDA and failed."""
    import torch

    from brainseg_ray.cli import main

    uri, s3 = explicit_s3_model
    out = tmp_path / "report"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["evaluate", "--model", uri, "--data", synthetic_dataset, "--out", str(out),
                 "--s3-endpoint", s3.endpoint_url, "worst_slices=1", "precision=fp32", "use_gpu=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["models"][0]["model_uri"] == uri and report["models"][0]["metrics"]["num_patients"] == 6
    assert report["models"][0]["extra"]["device"] == "cpu"
    assert report["models"][0]["extra"]["backend"] == "onnxruntime"  # auto, computing in float32 on a CPU
