"""A small 2-D U-Net for slice-wise lesion segmentation on CPU.

Why 2-D: clinical stroke DWI is thick-sliced (4-6 mm with gaps), so there is
little through-plane context to exploit and a 2-D network sees every slice at
full in-plane resolution with a fraction of the compute of a 3-D one.  Input
is (N, 2, H, W) with N = slices of one study and channels (DWI, ADC) as made by
``service.preprocess``; output is lesion logits (N, 1, H, W).  H and W must be
divisible by ``2 ** depth``.

Budget: ~0.4 M parameters, ~0.6 GMAC per 128x128 slice, so a 25-slice study
runs in about a second on two CPU cores with ONNX Runtime.  BatchNorm folds
into the convolutions at export, so it costs nothing at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class UNet2DConfig:
    """Widths per resolution level, from full resolution down to the bottleneck."""

    in_channels: int = 2
    out_channels: int = 1
    widths: tuple[int, ...] = (16, 32, 64, 96)

    def __post_init__(self) -> None:
        if len(self.widths) < 2 or min(self.widths) < 1:
            raise ValueError(f"invalid U-Net widths {self.widths}")

    @property
    def divisor(self) -> int:
        """H and W must be multiples of this."""
        return int(2 ** (len(self.widths) - 1))


class _ConvBlock(nn.Sequential):
    """Two 3x3 conv -> BatchNorm -> ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class UNet2D(nn.Module):
    """Encoder-decoder with skip connections; returns logits, not probabilities."""

    def __init__(self, config: UNet2DConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNet2DConfig()
        widths = self.config.widths
        self.encoders = nn.ModuleList()
        c_in = self.config.in_channels
        for w in widths:
            self.encoders.append(_ConvBlock(c_in, w))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.upsamplers.append(nn.ConvTranspose2d(c_in, w_skip, 2, stride=2))
            self.decoders.append(_ConvBlock(2 * w_skip, w_skip))
            c_in = w_skip
        self.head = nn.Conv2d(c_in, self.config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class SigmoidHead(nn.Module):
    """Wraps a logit network so the exported graph returns probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
