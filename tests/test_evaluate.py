"""The evaluate job's plumbing on the synthetic dataset: models on an explicit S3 endpoint, and
its GPU setting kept as given. (Its figures are checked in test_train.py, on a trained model.)"""

from __future__ import annotations

import json


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
