"""The plain U-Net of the original LGG notebooks (Buda et al.'s brain-segmentation U-Net).

Four encoder levels of (3x3 conv, batch-norm, ReLU) x 2 with `base_filters` doubling per level
(32, 64, 128, 256 by default), a bottleneck at 16x base (512), 2x2 max-pool down and 2x2
ConvTranspose up (learned up-sampling, as in those notebooks, rather than bilinear), skip
concatenation, and a 1x1 head. It returns logits: the sigmoid belongs to the loss and to inference.
Any input whose height and width are divisible by 16 works.
"""

from __future__ import annotations

import torch
from torch import nn

from brainseg_ray.models.spec import ModelSpec

NAME = "unet"  # its registry name
LEVELS = 4  # encoder levels; the bottleneck is one more below them


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """(3x3 conv, BN, ReLU) x 2; convs carry no bias because batch-norm follows."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, classes: int = 1, base_filters: int = 32) -> None:
        super().__init__()
        widths = [base_filters * 2**i for i in range(LEVELS)]  # 32, 64, 128, 256
        self.encoders = nn.ModuleList()
        channels = in_channels
        for width in widths:
            self.encoders.append(double_conv(channels, width))
            channels = width
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = double_conv(channels, channels * 2)  # 512
        channels *= 2
        self.upconvs = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(widths):
            self.upconvs.append(nn.ConvTranspose2d(channels, width, kernel_size=2, stride=2))
            self.decoders.append(double_conv(width * 2, width))  # skip + up-sampled
            channels = width
        self.head = nn.Conv2d(channels, classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        divisor = 2**LEVELS
        if x.shape[-2] % divisor or x.shape[-1] % divisor:
            raise ValueError(f"UNet input height and width must be divisible by {divisor}, got {tuple(x.shape[-2:])}")
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for upconv, decoder, skip in zip(self.upconvs, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upconv(x), skip], dim=1))
        return self.head(x)


def build_unet(spec: ModelSpec) -> nn.Module:
    """The registry's builder for `unet`: base_filters shapes it; it has no pretrained encoder."""
    if spec.encoder_weights_path or spec.encoder_weights:
        raise ValueError("model 'unet' has no pretrained encoder: encoder weights apply to smp models only")
    return UNet(in_channels=spec.in_channels, classes=spec.classes, base_filters=spec.base_filters)
