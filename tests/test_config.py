"""Configuration: defaults < YAML < flags < key=value, with errors that name the setting."""

from __future__ import annotations

import pytest

from brainseg_ray.config import ConfigError, IngestConfig, load_config


def test_layers_override_in_order(tmp_path):
    path = tmp_path / "ingest.yaml"
    path.write_text("source: /a\nslices_per_task: 10\ns3:\n  region: eu-west-1\n")
    cfg = load_config(IngestConfig, str(path), ["slices_per_task=20", "s3.endpoint_url=http://x:1"], source="/b")
    assert (cfg.source, cfg.slices_per_task, cfg.s3.region, cfg.s3.endpoint_url) == ("/b", 20, "eu-west-1", "http://x:1")
    assert load_config(IngestConfig).slices_per_task == IngestConfig().slices_per_task


@pytest.mark.parametrize("override,message", [
    ("nope=1", "unknown setting nope"),
    ("s3.nope=1", "unknown setting s3.nope"),
    ("slices_per_task=abc", "slices_per_task: expected int"),
    ("ray.include_dashboard=maybe", "ray.include_dashboard: expected true or false"),
    ("slices_per_task", "not of the form key=value"),
])
def test_bad_settings_name_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(IngestConfig, None, [override])


@pytest.mark.parametrize("override, expected", [("lr=1e-5", 1e-5), ("lr=0.003", 0.003), ("lr=2", 2.0), ("lr=1.0e-4", 1e-4)])
def test_float_settings_read_like_numbers(override, expected):
    from brainseg_ray.config import TrainConfig

    assert load_config(TrainConfig, None, [override]).lr == expected


def test_a_word_is_not_a_float():
    from brainseg_ray.config import TrainConfig

    with pytest.raises(ConfigError, match="lr: expected float"):
        load_config(TrainConfig, None, ["lr=fast"])


def test_nested_train_settings_of_lr_find():
    from brainseg_ray.config import LrFindConfig

    cfg = load_config(LrFindConfig, None, ["train.batch_size=8", "steps=50"], train={"data": "/d"})
    assert (cfg.train.batch_size, cfg.train.data, cfg.steps) == (8, "/d", 50)


def test_a_flag_for_one_nested_setting_keeps_the_files_others(tmp_path):
    from brainseg_ray.config import SegmentJobConfig

    path = tmp_path / "segment.yaml"
    path.write_text("segmenter:\n  model: /file-model\n  tta: true\n  min_component_px: 9\n")
    cfg = load_config(SegmentJobConfig, str(path), ["segmenter.threshold=0.3"], segmenter={"model": "/flag-model"})
    assert (cfg.segmenter.model, cfg.segmenter.tta, cfg.segmenter.min_component_px, cfg.segmenter.threshold) == (
        "/flag-model", True, 9, 0.3)


def test_gpu_settings_have_one_shape():
    """use_gpu (None: GPUs when the cluster has one) and, with a GPU, the share of one per actor."""
    from brainseg_ray.config import EvaluateConfig, SegmenterConfig, SegmentJobConfig, ServeConfig, TrainConfig

    for cls in (TrainConfig, EvaluateConfig, SegmentJobConfig, ServeConfig):
        assert cls().use_gpu is None, cls.__name__
        assert load_config(cls, None, ["use_gpu=false"]).use_gpu is False, cls.__name__
    assert EvaluateConfig().gpus_per_actor == SegmentJobConfig().gpus_per_actor == ServeConfig().gpus_per_replica == 1.0
    assert not hasattr(SegmenterConfig(), "use_gpu")  # the job decides for its actors
    with pytest.raises(ConfigError, match="unknown setting num_gpus_per_actor"):
        load_config(SegmentJobConfig, None, ["num_gpus_per_actor=1"])
