"""The evaluate job's plumbing on the synthetic dataset: models on an explicit S3 endpoint, and
its GPU setting kept as given. (Its figures are checked in test_train.py, on a trained model.)"""

from __future__ import annotations

import json

from conftest import tiny_artifact


def test_a_model_on_an_explicit_s3_endpoint_is_read_with_the_jobs_s3_options(synthetic_dataset, explicit_s3_model,
                                                                           tmp_path):
    """`brainseg evaluate --s3-endpoint URL` with an s3:// model: the driver's load (and the
    scoring actors') go through the job's S3 options, not the AWS environment."""
    from brainseg_ray.cli import main

    uri, s3 = explicit_s3_model
    out = tmp_path / "report"
    assert main(["evaluate", "--model", uri, "--data", synthetic_dataset, "--out", str(out),
                 "--s3-endpoint", s3.endpoint_url, "worst_slices=1", "precision=fp32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["models"][0]["model_uri"] == uri and report["models"][0]["metrics"]["num_patients"] == 6
    assert report["models"][0]["extra"]["backend"] == "onnxruntime"  # auto, computing in float32 on a CPU


def test_use_gpu_false_stays_false(synthetic_dataset, tmp_path, monkeypatch):
    """use_gpu=false is never a GPU, also where one is visible: the job used to pass
    `cfg.use_gpu or None`, turning false into "a GPU when one is visible". The driver is told here
    that a GPU is visible; its Segmenter (the gallery's) must stay on the CPU, where before it
    moved the model to CUDA and failed."""
    import torch

    from brainseg_ray.config import EvaluateConfig
    from brainseg_ray.evaluate.run import evaluate

    model = tiny_artifact(tmp_path / "model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = evaluate(EvaluateConfig(models=[model], data=synthetic_dataset, out=str(tmp_path / "report"),
                                     use_gpu=False, worst_slices=1, precision="fp32", backend="torch"))
    assert result.report["models"][0]["extra"]["device"] == "cpu"
    assert result.report["models"][0]["extra"]["backend"] == "torch"
