"""The model registry: every name builds offline, the plain U-Net's shape, helpful errors, and
local encoder weights."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from brainseg_ray.models import ModelSpec, available_models, build_model, resolve
from brainseg_ray.models.registry import has_unused_parameters, model_settings
from brainseg_ray.models.unet import UNet

FIXED_NAMES = ["unet", "unet-resnet18", "unet-resnet34", "unet-resnet50", "unet-resnet101",
               "unet-resnet152", "unet-resnext50_32x4d", "unet-efficientnet-lite0", "unet-efficientnet-lite1",
               "unet-efficientnet-lite2"]


def test_available_models_lists_the_fixed_names():
    assert available_models() == sorted(FIXED_NAMES)


@pytest.mark.parametrize("name", ["unet", "unet-resnet18", "unet-resnet34", "smp:FPN:efficientnet-b0",
                                  "smp:Unet:mobilenet_v2", "smp:fpn:resnet18"])
def test_forward_gives_logits_of_input_size(name):
    model = build_model(ModelSpec(name)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 1, 64, 64) and out.dtype == torch.float32


def test_the_registry_says_which_settings_shape_each_family():
    assert model_settings(ModelSpec("unet", base_filters=8, encoder_depth=3)) == \
        {"name": "unet", "in_channels": 3, "classes": 1, "base_filters": 8}
    assert model_settings(ModelSpec("unet-resnet18", base_filters=8, encoder_depth=4)) == \
        {"name": "unet-resnet18", "in_channels": 3, "classes": 1, "encoder_depth": 4}
    assert has_unused_parameters(ModelSpec("unet-resnet18", encoder_depth=4))
    assert not has_unused_parameters(ModelSpec("unet-resnet18"))
    assert not has_unused_parameters(ModelSpec("unet", encoder_depth=3))  # the plain U-Net has no encoder depth


def test_builder_modules_do_not_import_the_registry():
    """The registry takes its builders from the leaf modules, never the other way round."""
    import inspect

    from brainseg_ray.models import smp_models, spec, unet

    for module in (spec, unet, smp_models):
        assert "models.registry" not in inspect.getsource(module), module.__name__


def test_large_encoders_build():
    # Built once, no forward pass: they are slow on CPU and share the Unet decoder tested above.
    for name in ["unet-resnet50", "unet-resnet101", "unet-resnet152", "unet-resnext50_32x4d"]:
        model = build_model(ModelSpec(name))
        assert isinstance(model, nn.Module) and model.encoder.out_channels[-1] == 2048, name


def test_spec_fields_reach_the_model():
    model = build_model(ModelSpec("unet-resnet18", in_channels=1, classes=3, encoder_depth=4)).eval()
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    assert len(model.encoder.out_channels) == 5  # input + 4 stages
    plain = build_model(ModelSpec("unet", in_channels=1, classes=2, base_filters=8)).eval()
    assert plain(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_plain_unet_structure():
    model = build_model(ModelSpec("unet"))
    assert isinstance(model, UNet)
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    up = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    # two 3x3 convs per level: 4 encoder + bottleneck + 4 decoder, then the 1x1 head
    assert sum(c.kernel_size == (3, 3) for c in convs) == 18
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 1
    assert [e[0].out_channels for e in model.encoders] == [32, 64, 128, 256]
    assert model.bottleneck[0].out_channels == 512
    assert [u.out_channels for u in up] == [256, 128, 64, 32]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 18
    params = sum(p.numel() for p in model.parameters())
    assert 7_000_000 < params < 8_500_000  # the LGG notebooks' U-Net has about 7.8 M
    with pytest.raises(ValueError, match="divisible by 16"):
        model.eval()(torch.rand(1, 3, 40, 40))


def test_unknown_names_say_what_is_valid():
    with pytest.raises(ValueError, match="unet-resnet34") as info:
        build_model(ModelSpec("resnet-unet"))
    assert "smp:<Architecture>:<encoder>" in str(info.value)
    with pytest.raises(ValueError, match="unknown smp architecture 'Foo'.*FPN.*Unet"):
        resolve("smp:Foo:resnet18")
    with pytest.raises(ValueError, match="unknown encoder 'resnet999'"):
        resolve("smp:Unet:resnet999")
    with pytest.raises(ValueError, match="unknown encoder 'tu-no_such_net'"):
        resolve("smp:Unet:tu-no_such_net")
    with pytest.raises(ValueError, match="expected 'smp:<Architecture>:<encoder>'"):
        resolve("smp:Unet")
    with pytest.raises(ValueError, match="smp models only"):
        build_model(ModelSpec("unet", encoder_weights_path="/nowhere.pt"))


def test_building_reaches_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while building a model: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in ["unet", "unet-resnet18", "smp:FPN:efficientnet-b0"]:
        build_model(ModelSpec(name))


def _perturbed_encoder_state(name: str) -> dict[str, torch.Tensor]:
    encoder = build_model(ModelSpec(name)).encoder
    return {k: v + 1 if v.is_floating_point() else v for k, v in encoder.state_dict().items()}


def test_encoder_weights_path_loads_a_local_state_dict(tmp_path):
    state = _perturbed_encoder_state("unet-resnet18")
    plain = tmp_path / "encoder.pt"
    torch.save(state, plain)
    model = build_model(ModelSpec("unet-resnet18", encoder_weights_path=str(plain)))
    loaded = model.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    # An ImageNet-style checkpoint (with a classifier head) and a whole model's ('encoder.' keys) load too.
    imagenet = tmp_path / "imagenet.pt"
    torch.save({**state, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, imagenet)
    build_model(ModelSpec("unet-resnet18", encoder_weights_path=str(imagenet)))
    whole = tmp_path / "whole.pt"
    torch.save({f"encoder.{k}": v for k, v in state.items()}, whole)
    model = build_model(ModelSpec("unet-resnet18", encoder_weights_path=str(whole)))
    assert torch.equal(model.encoder.conv1.weight, state["conv1.weight"])


def test_encoder_weights_that_do_not_fit_are_refused(tmp_path):
    state = _perturbed_encoder_state("unet-resnet18")
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, partial)
    with pytest.raises(ValueError, match=r"missing keys \[layer4\."):
        build_model(ModelSpec("unet-resnet18", encoder_weights_path=str(partial)))
    extra = tmp_path / "extra.pt"
    torch.save({**state, "layer9.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError, match=r"1 unexpected keys \[layer9.weight\]"):
        build_model(ModelSpec("unet-resnet18", encoder_weights_path=str(extra)))
    wide = tmp_path / "wide.pt"  # same keys, another shape
    torch.save({**state, "conv1.weight": torch.zeros(64, 4, 7, 7)}, wide)
    with pytest.raises(ValueError, match="do not fit"):
        build_model(ModelSpec("unet-resnet18", encoder_weights_path=str(wide)))
    with pytest.raises(ValueError, match="cannot load encoder weights"):
        build_model(ModelSpec("unet-resnet18", encoder_weights_path=str(tmp_path / "absent.pt")))
