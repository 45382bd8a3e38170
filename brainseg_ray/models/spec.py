"""What a model is, as the registry builds it and an artifact records it: one small spec.

The base of the models package: the builders (unet.py, smp_models.py) and the registry all import
it, and it imports none of them, so no module imports another back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry name, e.g. "unet", "unet-resnet34", "smp:FPN:efficientnet-b0"
    in_channels: int = 3
    classes: int = 1
    encoder_depth: int = 5  # smp models only
    base_filters: int = 32  # plain unet only
    encoder_weights_path: str | None = None  # local state_dict for the encoder (smp models only)
    encoder_weights: str | None = None  # "imagenet": installed ImageNet weights (models/pretrained.py)


Builder = Callable[[ModelSpec], nn.Module]
