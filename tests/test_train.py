"""The train and evaluate jobs end to end on synthetic data, with real Ray Train and Ray Data.

The learning test is the one that says the system works: a small U-Net trained by the train job
must reach a per-patient Dice of at least 0.8 on synthetic patients it never saw (neither trained
nor validated on).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from brainseg_ray import storage
from brainseg_ray.config import EvaluateConfig, TrainConfig
from brainseg_ray.models.artifact import load_artifact

TINY = dict(model="unet", base_filters=4, image_size=64, batch_size=4, augmentation="light")
HISTORY_KEYS = {"epoch", "train_loss", "val_loss", "val_patient_dice", "val_slice_dice", "lr", "train_samples",
                "train_samples_per_s", "is_best"}


@pytest.fixture(scope="session")
def learning_data(ray_local, tmp_path_factory):
    """12 synthetic patients, ingested, split 8/2/2 by patient (split.json as `brainseg split` writes)."""
    from brainseg_ray.config import IngestConfig
    from brainseg_ray.data.ingest import ingest
    from brainseg_ray.data.split import assign_splits
    from brainseg_ray.data.synthetic import write_synthetic_dataset
    from brainseg_ray.data.tables import tumour_slices_by_patient

    root = tmp_path_factory.mktemp("learning")
    synth = write_synthetic_dataset(str(root / "synth"), patients=12, seed=11)
    data = ingest(IngestConfig(source=synth.root, out=str(root / "dataset"))).out
    splits = assign_splits(tumour_slices_by_patient(data), (0.67, 0.165, 0.165), seed=0)
    split_file = root / "split.json"
    split_file.write_text(json.dumps({"splits": splits}))
    return data, str(split_file), splits


@pytest.fixture(scope="session")
def trained_run(learning_data, tmp_path_factory):
    from brainseg_ray.train.trainer import train

    data, split_file, _ = learning_data
    cfg = TrainConfig(data=data, out=str(tmp_path_factory.mktemp("run") / "run"), model="unet", base_filters=8,
                      image_size=64, batch_size=8, lr=6e-3, epochs=5, split_file=split_file, keep_checkpoints=2)
    # 64 px, 5 epochs at 6e-3: held-out patient Dice 0.88 on this data (0.8 is asked below; 128 px at
    # 3e-3 gave 0.90 at twice the cost, 64 px at 3e-3 only 0.81).
    return cfg, train(cfg)


def test_learning_reaches_dice_on_held_out_patients(learning_data, trained_run, tmp_path):
    from brainseg_ray.evaluate.run import evaluate

    data, split_file, splits = learning_data
    cfg, result = trained_run
    test_patients = sorted(p for p, s in splits.items() if s == "test")
    evaluated = evaluate(EvaluateConfig(models=[result.model_uri], data=data, out=str(tmp_path / "report"),
                                        split_file=split_file, split="test"))
    metrics = evaluated.report["models"][0]["metrics"]
    assert sorted(metrics["patient_dice"]) == test_patients  # only the held-out patients
    assert metrics["patient_dice_mean"] >= 0.8, metrics["patient_dice"]
    assert metrics["detection"]["sensitivity"] >= 0.8


def test_train_run_folder(learning_data, trained_run):
    data, split_file, splits = learning_data
    cfg, result = trained_run
    out = Path(cfg.out)
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1)) == \
        list(range(1, result.epochs_run + 1))
    assert HISTORY_KEYS <= set(history[0])
    assert (out / "history.csv").read_text().splitlines()[0].startswith("epoch,step,train_loss,val_loss")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The best checkpoint is the best epoch of the history, and it is what OUT/model holds.
    best = max(history, key=lambda r: (r["val_patient_dice"], -r["epoch"]))
    assert result.best_epoch == best["epoch"] and result.best_val_patient_dice == pytest.approx(best["val_patient_dice"])
    kept = sorted(p.name for p in (out / "checkpoints").glob("epoch-*"))
    assert f"epoch-{best['epoch']:04d}" in kept and f"epoch-{len(history):04d}" in kept  # best and latest
    assert len(kept) <= cfg.keep_checkpoints + 1
    artifact = load_artifact(result.model_uri)
    meta = artifact.metadata
    manifest = json.loads(Path(data, "manifest.json").read_text())
    assert meta["data_fingerprint"] == manifest["fingerprint"]
    assert meta["input"]["size"] == 64 and meta["architecture"] == "unet"
    assert meta["training"]["epoch"] == best["epoch"]
    assert meta["training"]["split"]["val"] == sorted(p for p, s in splits.items() if s == "val")
    assert meta["metrics"]["validation"]["patient_dice_mean"] == pytest.approx(best["val_patient_dice"])
    assert meta["normalisation"]["mean"] == pytest.approx([m / 255 for m in manifest["profile"]["channels"]["mean"]])


def test_evaluate_reproduces_validation_and_compares_models(learning_data, trained_run, tmp_path):
    """Two models on the validation patients through the CLI, with a threshold sweep: the sweep row
    at the model's own threshold is the headline figure."""
    from brainseg_ray.cli import main

    data, split_file, _ = learning_data
    cfg, result = trained_run
    first_epoch = next(Path(cfg.out, "checkpoints").glob("epoch-*"))
    report_dir = tmp_path / "report"
    assert main(["evaluate", "--model", result.model_uri, "--model", str(first_epoch), "--data", data,
                 "--out", str(report_dir), "--split-file", os.path.join(cfg.out, "split.json"), "--split", "val",
                 # torch at the run's precision, as training validated: the same numbers to 1e-9
                 "thresholds=[0.05, 0.5, 0.95]", "backend=torch"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    best = report["models"][0]
    # The same patients, model and threshold as the training run's validation: the same figure.
    assert best["metrics"]["patient_dice_mean"] == pytest.approx(result.best_val_patient_dice, abs=1e-9)
    assert len(report["comparison"]) == 2
    assert best["metrics"]["num_patients"] == 2
    assert len(best["worst"]) == min(12, best["metrics"]["num_slices"])
    losses = [w["loss"] for w in best["worst"]]
    assert losses == sorted(losses, reverse=True)
    for figure in best["figures"].values():
        assert (report_dir / figure).read_bytes()[:4] == b"\x89PNG"
    assert "| Model |" in (report_dir / "report.md").read_text()

    assert [r["threshold"] for r in best["sweep"]] == [0.05, 0.5, 0.95]
    assert best["sweep"][1]["patient_dice_mean"] == pytest.approx(best["metrics"]["patient_dice_mean"], abs=1e-12)
    assert len({r["patient_dice_mean"] for r in best["sweep"]}) == 3  # each threshold cut on its own
    assert "### Threshold sweep" in (report_dir / "report.md").read_text()


@pytest.mark.parametrize("scores, best_epoch, chosen", [
    ({1: 0.80, 2: 0.805, 3: 0.79}, 1, 1),  # epoch 2 beat epoch 1 by less than min_delta
    ({2: 0.805, 3: 0.79}, 1, 2),  # the run's best epoch was not kept: the highest score
    ({1: 0.80, 2: 0.80}, None, 1),  # no improvement recorded: highest score, earliest of equals
    ({1: None, 2: 0.70}, None, 2),  # an epoch without a validation figure is never chosen
])
def test_the_saved_model_is_the_epoch_the_run_called_best(scores, best_epoch, chosen):
    from brainseg_ray.train.loop import SCORE
    from brainseg_ray.train.trainer import chosen_checkpoint

    kept = [(f"epoch-{e}", {"epoch": e, SCORE: s}) for e, s in scores.items()]
    assert chosen_checkpoint(kept, best_epoch)[0] == f"epoch-{chosen}"


def test_no_scored_checkpoint_is_a_training_error():
    from brainseg_ray.train.loop import SCORE
    from brainseg_ray.train.trainer import TrainingError, chosen_checkpoint

    with pytest.raises(TrainingError, match="without a checkpoint"):
        chosen_checkpoint([("epoch-1", {"epoch": 1, SCORE: None})], None)


def _snapshot_lists(folder: Path, checkpoint: str) -> bool:
    return any(checkpoint in p.read_text(errors="ignore") for p in folder.glob("*snapshot*.json"))


def test_resume_after_the_job_is_killed(ray_local, synthetic_dataset, tmp_path, monkeypatch, capsys):
    """Kill the train job's driver after its first checkpoint (Ray then ends the job's trainer and
    workers); the same command again continues from the saved step and ends with one unbroken
    history. Both join the session's Ray with --address (no Ray of their own to start). The run
    is counted in steps (a compute budget: 16 steps, a checkpoint every 2) and trains on crops at
    native resolution, half of them centred near tumour; validation sees whole slices. Eight
    checkpoints, not three: a loaded machine once let a short run finish before the kill landed. The run
    folder is relative, as a user types it (Ray Train's workers run elsewhere), and model.json
    records it so: provenance holds no path of the training machine."""
    out = tmp_path / "run"
    address = ray_local.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "brainseg_ray.cli", "train", "--data", synthetic_dataset, "--out", "run",
               "--address", address, "val_fraction=0.34",
               *(f"{k}={v}" for k, v in TINY.items() if k != "model"), "--model", "unet",
               "steps=16", "eval_every_steps=2", "schedule=cosine", "crop_size=64", "foreground_fraction=0.5",
               "image_size=256", "normalisation=slice"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while not _snapshot_lists(out / "checkpoints", "epoch-0001"):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    done_before = json.loads((out / "history.json").read_text())
    assert 1 <= len(done_before) < 8

    second = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = [line for line in (second.stdout + second.stderr).splitlines() if "resuming after step" in line]
    assert resumed, second.stdout[-2000:]
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, 9))
    assert [row["step"] for row in history] == list(range(2, 17, 2))
    # Steps finished before the kill are kept as they were, not trained again.
    assert history[0]["train_loss"] == done_before[0]["train_loss"]
    assert "resumed after epoch" in second.stdout
    assert all(row["train_samples"] == 8 and row["train_foreground_crops"] <= 4 for row in history)
    assert sum(row["train_foreground_crops"] for row in history) >= 22  # about half of the 64 crops; at least a third, as before
    # The cosine schedule ran over the 16 steps of both processes: it ends at its floor.
    assert history[-1]["lr"] == pytest.approx(TrainConfig().lr / 1000, rel=1e-3)
    meta = load_artifact(str(out / "model")).metadata
    assert meta["input"]["size"] == 256 and meta["training"]["config"]["crop_size"] == 64
    # Each slice was rescaled before its crop; every consumer of the model does the same.
    assert meta["normalisation"]["slice_target"] == 150 and meta["normalisation"]["slice_percentile"] == 99
    assert meta["training"]["config"]["out"] == "run" and str(tmp_path) not in json.dumps(meta["training"])
    checkpoint = json.loads(next((out / "checkpoints").glob("epoch-*/model.json")).read_text())
    assert checkpoint["training"]["config"]["out"] == "run"

    # The same folder cannot quietly continue a run of another model (refused before any Ray work).
    from brainseg_ray.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*command[3:], "base_filters=8"]) == 2
    assert "other base_filters" in capsys.readouterr().err
    assert main([*command[3:], "normalisation=dataset"]) == 2
    assert "other normalisation" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-net"], "unknown model"),
    (["batch_size=4096"], "fewer than batch_size"),
    (["augmentation=wild"], "augmentation must be one of"),
    (["crop_size=64", "image_size=128"], "native resolution: image_size must stay 256"),
    (["crop_size=300"], "crop_size must be a multiple of 32"),
    (["schedule=linear"], "schedule must be one of one_cycle, cosine"),
    (["normalisation=zscore"], "normalisation must be one of dataset, slice"),
    (["--model", "unet-resnet18", "encoder_weights=imagenet"], "no ImageNet weights are installed"),
])
def test_train_refuses_bad_settings_with_one_line(synthetic_dataset, tmp_path, capsys, args, message):
    from brainseg_ray.cli import main

    code = main(["train", "--data", synthetic_dataset, "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_train_refuses_a_folder_that_is_not_a_dataset(ray_local, tmp_path, capsys):
    from brainseg_ray.cli import main

    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 2 and "not an ingested dataset" in capsys.readouterr().err


def test_evaluate_refuses_a_missing_model(synthetic_dataset, tmp_path, capsys):
    from brainseg_ray.cli import main

    code = main(["evaluate", "--model", str(tmp_path / "nothing"), "--data", synthetic_dataset,
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "nothing" in err and "not an artifact" in err


def test_evaluate_post_processing_is_the_segmenters(learning_data, trained_run, tmp_path):
    """With the 3-D step, each patient's Dice is what the Segmenter gives on that patient's whole
    stack (checked by hand). (The threshold sweep is checked with the CLI evaluate above.)"""
    from brainseg_ray.config import SegmenterConfig
    from brainseg_ray.data import schema
    from brainseg_ray.data.tables import decode_tensor, read_slices_table
    from brainseg_ray.evaluate.run import evaluate
    from brainseg_ray.inference.segmenter import Segmenter
    from brainseg_ray.train.metrics import dice

    data, split_file, splits = learning_data
    _, result = trained_run
    common = dict(models=[result.model_uri], data=data, split_file=split_file, split="val", worst_slices=2)
    cleaned = evaluate(EvaluateConfig(out=str(tmp_path / "3d"), largest_component_3d=True, min_component_px=20,
                                      **common)).report["models"][0]
    assert cleaned["postprocess"] == {"min_component_px": 20, "min_component_peak": 0.0, "largest_component_3d": True,
                                      "keep_3d_fraction": 1.0, "tta": False}
    segmenter = Segmenter(SegmenterConfig(model=result.model_uri, largest_component_3d=True, min_component_px=20))
    for patient in sorted(p for p, s in splits.items() if s == "val"):
        rows = read_slices_table(data, None, columns=["slice_index", "image", "mask"],
                                 filters=[("patient_id", "=", patient)]).sort_by("slice_index")
        images = decode_tensor(rows.column("image"), schema.IMAGE_SHAPE)
        truth = decode_tensor(rows.column("mask"), schema.MASK_SHAPE)
        masks = [s.mask for s in segmenter.segment(images, [patient] * len(images),
                                                  rows.column("slice_index").to_pylist())]
        assert cleaned["metrics"]["patient_dice"][patient] == pytest.approx(dice(np.stack(masks), truth), abs=1e-9)


def test_init_from_with_two_ddp_workers_to_s3_stops_early(learning_data, trained_run, s3_bucket, tmp_path, capsys):
    """Two DDP workers over gloo, checkpoints and the model on S3 (moto), all through the job,
    starting at the trained artifact: with a learning rate too small to learn anything, every learned
    weight stays the artifact's. min_delta=1 makes any later epoch "no better"
    than the first: with patience 1 the run stops after epoch 2 of 3, and the model is epoch 1's.
    A mismatched init_from model is refused in one line."""
    from brainseg_ray.cli import main
    from brainseg_ray.train.trainer import train

    data, split_file, _ = learning_data
    _, result = trained_run
    out = f"{s3_bucket}/runs/ddp"
    cfg = TrainConfig(data=data, out=out, model="unet", base_filters=8, image_size=64, batch_size=8, lr=1e-12,
                      epochs=3, num_workers=2, split_file=split_file, init_from=result.model_uri,
                      early_stopping_patience=1, min_delta=1.0)
    tuned = train(cfg)
    assert tuned.stopped_early and tuned.epochs_run == 2 and "stopped early" in tuned.summary_line()
    assert [row["is_best"] for row in tuned.history] == [True, False] and HISTORY_KEYS <= set(tuned.history[0])
    assert tuned.best_epoch == 1 and load_artifact(tuned.model_uri).metadata["training"]["epoch"] == 1
    train_slices = json.loads(storage.read_bytes(f"{out}/model/model.json"))["training"]["slices"]["train"]
    per_worker = train_slices // 2
    assert tuned.history[0]["train_samples"] == 2 * (per_worker // cfg.batch_size) * cfg.batch_size
    for name in ("model.json", "weights.safetensors", "training_state.pt", "history.json"):
        assert storage.exists(f"{out}/checkpoints/epoch-0001/{name}"), name
    assert load_artifact(tuned.model_uri).spec.name == "unet"
    assert storage.exists(f"{out}/curves.png") and storage.exists(f"{out}/split.json")

    # Weights, not Dice: BatchNorm's running statistics still move in train mode, and one epoch of
    # them moved validation Dice 0.07 below the artifact's in one CI run (0.853 against 0.922).
    start = dict(load_artifact(result.model_uri).model.named_parameters())
    for name, weight in load_artifact(tuned.model_uri).model.named_parameters():
        assert torch.allclose(weight, start[name], atol=1e-6), name
    assert tuned.best_val_patient_dice >= 0.6
    record = load_artifact(tuned.model_uri).metadata["training"]["init_from"]
    assert record == {"uri": result.model_uri, "version": load_artifact(result.model_uri).metadata["version"]}

    code = main(["train", "--data", data, "--out", str(tmp_path / "bad"), "--model", "unet", "base_filters=4",
                 f"init_from={result.model_uri}", f"split_file={split_file}"])
    err = capsys.readouterr().err
    # (Ray's own workers of the run above may still log to stderr; the job's error is one line.)
    line = next(l for l in err.splitlines() if l.startswith("brainseg train: error:"))
    assert code == 2 and "init_from" in line and "'base_filters': 8" in line
    # Weights that learned dataset-normalised inputs do not start a per-slice run.
    code = main(["train", "--data", data, "--out", str(tmp_path / "bad"), "--model", "unet", "base_filters=8",
                 f"init_from={result.model_uri}", f"split_file={split_file}", "normalisation=slice"])
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("brainseg train: error:"))
    assert code == 2 and "trained with normalisation=dataset, this run has normalisation=slice" in line


def test_init_from_reads_an_s3_model_with_the_runs_s3_options(explicit_s3_model, tmp_path):
    """init_from on a custom S3 endpoint (MinIO, moto) is read through the run's s3 options: the
    refusal of a mismatched model quotes the artifact's own settings, so it was read."""
    from brainseg_ray.train.trainer import TrainingError, train

    uri, s3 = explicit_s3_model  # a plain U-Net of base_filters 4
    cfg = TrainConfig(data=str(tmp_path / "dataset"), out=str(tmp_path / "run"), model="unet", base_filters=8,
                      init_from=uri, s3=s3)
    with pytest.raises(TrainingError, match="'base_filters': 4"):
        train(cfg)
