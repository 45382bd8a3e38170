"""The learning-rate range test (`brainseg lr-find`) on the ingested synthetic dataset: its curve,
its suggestions, its files, its errors and its command line. A tiny U-Net at 64x64 keeps each
run to a few seconds on two CPU cores."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from brainseg_ray.config import LrFindConfig, TrainConfig
from brainseg_ray.data.tables import tumour_slices_by_patient
from brainseg_ray.train.lr_find import LR_FIND_JSON, LR_FIND_PNG, lr_find, smooth
from brainseg_ray.train.trainer import TrainingError, choose_patients

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(model="unet", base_filters=4, image_size=64, batch_size=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The test machine is small and may be shared: OpenMP threads on busy cores wait on each
    # other and a step becomes many times slower. lr_find takes OMP_NUM_THREADS when it is set.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def config(data: str, out: str, *, train_out: str = "", start_lr: float = 1e-7, end_lr: float = 1.0,
           steps: int = 20, **train) -> LrFindConfig:
    return LrFindConfig(train=TrainConfig(data=data, out=train_out, **{**TINY, "augmentation": "light", **train}),
                        start_lr=start_lr, end_lr=end_lr, steps=steps, out=out)


def read_json(path) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(open(path).read(), parse_constant=refuse)


@pytest.fixture(scope="module")
def range_test(synthetic_dataset, tmp_path_factory):
    """One range test to 10 (far past any sensible LR for AdamW), read back from its files."""
    out = tmp_path_factory.mktemp("lr-find")
    cfg = config(synthetic_dataset, str(out), end_lr=10.0, steps=40)
    threads = torch.get_num_threads()
    result = lr_find(cfg)
    assert torch.get_num_threads() == threads  # the process's thread count is put back
    return cfg, result, read_json(out / LR_FIND_JSON), out


def test_writes_the_json_and_the_plot(range_test):
    cfg, result, record, out = range_test
    assert result.json_uri == str(out / LR_FIND_JSON) and result.png_uri == str(out / LR_FIND_PNG)
    assert result.out == cfg.out
    png = (out / LR_FIND_PNG).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    for key in ("lrs", "losses", "smoothed", "suggested_lr", "steepest", "min_loss_div10", "stopped_early",
                "model", "batch_size", "image_size", "steps_run", "train_patients"):
        assert key in record, key
    assert (record["model"], record["batch_size"], record["image_size"]) == ("unet", 4, 64)
    n = record["steps_run"]
    assert n == result.steps_run == len(record["lrs"]) == len(record["losses"]) == len(record["smoothed"])
    assert record["suggested_lr"] == result.suggested_lr and record["steepest"] == result.steepest
    assert record["min_loss_div10"] == result.min_loss_div10 and record["stopped_early"] == result.stopped_early
    assert all(math.isfinite(v) for v in record["losses"] + record["smoothed"])


def test_lrs_grow_geometrically_from_start_lr(range_test):
    cfg, result, record, _ = range_test
    lrs = np.array(record["lrs"])
    assert lrs[0] == pytest.approx(cfg.start_lr, rel=1e-12)
    assert np.all(np.diff(lrs) > 0)
    ratio = (cfg.end_lr / cfg.start_lr) ** (1 / (cfg.steps - 1))
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], ratio, rtol=1e-9)
    if not result.stopped_early:
        assert len(lrs) == cfg.steps and lrs[-1] == pytest.approx(cfg.end_lr, rel=1e-9)


def test_smoothed_loss_is_the_bias_corrected_moving_average(range_test):
    _, _, record, _ = range_test
    assert record["smoothed"][0] == pytest.approx(record["losses"][0])
    np.testing.assert_allclose(record["smoothed"], smooth(record["losses"], 0.98), rtol=1e-9)


def test_suggestions_lie_in_the_tested_range(range_test):
    cfg, result, record, _ = range_test
    lrs, smoothed = np.array(record["lrs"]), np.array(record["smoothed"])
    assert cfg.start_lr <= result.suggested_lr <= cfg.end_lr
    assert result.steepest is not None and result.suggested_lr == result.steepest
    # steepest: a tested LR past the first 10% of the points, where the smoothed loss falls fastest
    slopes = np.gradient(smoothed, np.log10(lrs))
    skip = max(1, len(lrs) // 10)
    assert result.steepest == pytest.approx(lrs[skip + int(np.argmin(slopes[skip:]))])
    assert slopes[list(lrs).index(result.steepest)] < 0
    expected = max(lrs[int(np.argmin(smoothed))] / 10, cfg.start_lr)
    assert result.min_loss_div10 == pytest.approx(expected)


def test_loss_blows_up_at_the_largest_lrs(range_test):
    _, result, record, _ = range_test
    smoothed = record["smoothed"]
    assert result.stopped_early or smoothed[-1] > min(smoothed)
    assert max(record["losses"][-5:]) > min(record["losses"])


def test_trains_on_the_training_patients_only(range_test, synthetic_dataset):
    cfg, _, record, _ = range_test
    train, val, _ = choose_patients(cfg.train, tumour_slices_by_patient(synthetic_dataset))
    assert record["train_patients"] == train
    assert not set(record["train_patients"]) & set(val)
    assert 0 < record["train_slices"]


def test_summary_line(range_test):
    _, result, _, out = range_test
    line = result.summary_line()
    pattern = (rf"lr-find: {result.steps_run} steps, suggested lr \d\.\de[+-]\d\d \(steepest descent; "
               rf"min-loss/10 \d\.\de[+-]\d\d\) -> {re.escape(str(out / LR_FIND_PNG))}")
    assert re.fullmatch(pattern, line), line
    assert f"{result.suggested_lr:.1e}" in line


def test_stops_early_when_the_loss_diverges_and_out_defaults_to_train_out(synthetic_dataset, tmp_path):
    cfg = config(synthetic_dataset, "", train_out=str(tmp_path / "run"), start_lr=0.01, end_lr=1e6, steps=20,
                 augmentation="none")
    result = lr_find(cfg)
    assert result.out == str(tmp_path / "run")
    record = read_json(tmp_path / "run" / LR_FIND_JSON)
    assert (tmp_path / "run" / LR_FIND_PNG).read_bytes().startswith(PNG_MAGIC)
    assert result.stopped_early and record["stopped_early"] and record["stop_reason"]
    assert result.steps_run < cfg.steps
    smoothed = record["smoothed"]
    assert smoothed[-1] > 4 * min(smoothed) and all(s <= 4 * min(smoothed[: i + 1]) for i, s in
                                                     enumerate(smoothed[:-1]))
    assert cfg.start_lr <= result.suggested_lr <= record["lrs"][-1]


def test_same_seed_gives_the_same_curve(synthetic_dataset, tmp_path):
    rng_state = torch.random.get_rng_state()
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        lr_find(config(synthetic_dataset, str(tmp_path / name), steps=12, seed=seed, end_lr=0.1))
        runs.append(read_json(tmp_path / name / LR_FIND_JSON))
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is left alone
    assert runs[0]["losses"] == runs[1]["losses"]
    assert runs[0]["suggested_lr"] == runs[1]["suggested_lr"]
    assert runs[0]["losses"] != runs[2]["losses"]


def _split_without_training_patients(data: str, path) -> str:
    path.write_text(json.dumps({"splits": {p: "val" for p in tumour_slices_by_patient(data)}}))
    return str(path)


@pytest.mark.parametrize("change,error,message", [
    (dict(start_lr=1.0, end_lr=1.0), ValueError, "end_lr (1.0) must be larger than start_lr (1.0)"),
    (dict(start_lr=0.1, end_lr=0.01), ValueError, "must be larger than start_lr"),
    (dict(start_lr=0.0), ValueError, "start_lr must be a positive number"),
    (dict(steps=5), ValueError, "steps must be at least 10"),
    (dict(model="no-such-net"), ValueError, "unknown model 'no-such-net'"),
    (dict(loss="no-such-loss"), TrainingError, "loss must be one of"),
    (dict(image_size=50), TrainingError, "image_size must be a multiple of 32"),
    (dict(data="MISSING"), TrainingError, "not an ingested dataset"),
    (dict(data=""), TrainingError, "lr-find needs data"),
    (dict(out=""), ValueError, "lr-find needs an out folder"),
    (dict(split_file="ALL_VAL"), TrainingError, "need training and validation patients, got 0"),
    (dict(batch_size=64), TrainingError, "fewer than batch_size 64"),
])
def test_user_mistakes_raise_clear_errors(synthetic_dataset, tmp_path, change, error, message):
    lr_keys = {"start_lr", "end_lr", "steps", "out"}
    train = {k: v for k, v in change.items() if k not in lr_keys}
    if train.get("data") == "MISSING":
        train["data"] = str(tmp_path / "no-such-dataset")
    if train.get("split_file") == "ALL_VAL":
        train["split_file"] = _split_without_training_patients(synthetic_dataset, tmp_path / "split.json")
    cfg = config(train.pop("data", synthetic_dataset), str(tmp_path / "out"), **train)
    for key in lr_keys & set(change):
        setattr(cfg, key, change[key])
    with pytest.raises(error, match=re.escape(message)):
        lr_find(cfg)
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_prints_the_summary_line(synthetic_dataset, tmp_path, capsys):
    from brainseg_ray.cli import main

    out = tmp_path / "cli"
    code = main(["lr-find", "--data", synthetic_dataset, "--out", str(out), "--model", "unet",
                 "train.base_filters=4", "train.image_size=64", "train.batch_size=4", "steps=20"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    last = captured.out.strip().splitlines()[-1]
    assert re.fullmatch(rf"lr-find: \d+ steps, suggested lr \S+ \(.+\) -> {re.escape(str(out / LR_FIND_PNG))}",
                        last), last
    record = read_json(out / LR_FIND_JSON)
    assert last.startswith(f"lr-find: {record['steps_run']} steps, suggested lr {record['suggested_lr']:.1e} (")
    assert record["lrs"][0] == pytest.approx(1e-7) and record["model"] == "unet"


def test_cli_missing_data_is_one_line(tmp_path, capsys):
    from brainseg_ray.cli import main

    missing = tmp_path / "nowhere"
    code = main(["lr-find", "--data", str(missing), "--out", str(tmp_path / "out"), "--model", "unet"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brainseg lr-find: error: ")
    assert str(missing) in lines[0] and "not an ingested dataset" in lines[0]
    assert "Traceback" not in captured.err


def test_suggestions_fall_back_to_min_loss_over_ten():
    from brainseg_ray.train.lr_find import LrFindResult, suggest

    lrs = [1e-4 * 10 ** (i / 4) for i in range(12)]
    falling = [1.0 - 0.05 * i for i in range(12)]
    steepest, div10 = suggest(lrs, [1.0, 1.0, 1.0, *falling[3:8], 0.5, 0.45, 0.44, 0.9], 1e-4)
    assert steepest == pytest.approx(lrs[3]) and div10 == pytest.approx(lrs[10] / 10)
    assert suggest(lrs[:5], falling[:5], 1e-4) == (None, pytest.approx(lrs[4] / 10))  # too few points
    rising = [1.0 + 0.1 * i for i in range(12)]
    assert suggest(lrs, rising, 1e-4) == (None, 1e-4)  # never fell; never below the tested range
    line = LrFindResult(out="o", suggested_lr=1e-4, steepest=None, min_loss_div10=1e-4, steps_run=12,
                        stopped_early=True, json_uri="o/lr_find.json", png_uri="o/lr_find.png").summary_line()
    assert line.startswith("lr-find: 12 steps, suggested lr 1.0e-04 (min-loss/10") and line.endswith("-> o/lr_find.png")
