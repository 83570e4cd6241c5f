"""3-D U-Net with pre-activation units (Noh et al. 2023).

The seed paper (Noh et al., "Deep learning algorithms for automatic
segmentation of acute cerebral infarcts on DWI: effects of training data
sample size, transfer learning, and data features") uses a "modified 3D
U-Net" (Cicek et al. 2016) whose every Conv3D-BN-ReLU unit is replaced by a
pre-activation unit BN-ReLU-Conv3D (He et al. 2016, identity mappings), with
"the number of CNN layers and the filters" changed but not reported.  So this
module keeps the 3-D U-Net shape and makes the unknowns parameters:

* ``base_width`` filters at full resolution, doubled per level (4 levels by
  default: base_width * (1, 2, 4, 8));
* each level: two pre-activation units; a plain stem convolution first (a
  BN-ReLU on the raw two-channel input would only rescale intensities);
* decoder: transposed convolution with kernel = stride = that level's pooling,
  concatenation with the skip, two pre-activation units; head BN-ReLU-Conv1x1.

Thick slices: clinical DWI has 3-7 mm slices against ~1-2 mm in-plane pixels
and often only 20-30 slices, so isotropic 2x2x2 pooling would reach one slice
after a few levels and mix voxels that are 3x farther apart through-plane.
``pools`` therefore defaults to (1, 2, 2) at the first level (in-plane only,
which brings 1.8 x 1.8 x 5 mm voxels to roughly isotropic 3.6 x 3.6 x 5 mm)
and (2, 2, 2) after that.

Input ``(N, 2, D, H, W)`` (DWI, ADC), output logits ``(N, 1, D, H, W)``.  Any
D, H, W work: the input is zero-padded at the far end of each axis up to the
pooling multiple (:attr:`PreActUNet3DConfig.divisor`) and the output cropped
back, inside ``forward`` so an exported graph accepts any slice count.
:class:`SliceStack3D` presents the net with the service's (slices, 2, H, W)
layout so the same model card and inference code serve it.

Parameter counts (2 in, 1 out, default pools): base_width 8 -> 352,257 (the
CPU variant); 16 -> 1,406,593; 32 -> 5,621,505.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Triple = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class PreActUNet3DConfig:
    """``pools[i]`` is the (z, y, x) downsampling between level i and i + 1."""

    in_channels: int = 2
    out_channels: int = 1
    base_width: int = 16
    pools: tuple[Triple, ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2))

    def __post_init__(self) -> None:
        if self.base_width < 1 or not self.pools:
            raise ValueError(f"invalid config {self}")
        if any(len(p) != 3 or min(p) < 1 for p in self.pools):
            raise ValueError(f"pools must be (z, y, x) triples >= 1, got {self.pools}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_width * 2**i for i in range(len(self.pools) + 1))

    @property
    def divisor(self) -> Triple:
        """(D, H, W) are padded up to multiples of this inside the model."""
        d, h, w = 1, 1, 1
        for pz, py, px in self.pools:
            d, h, w = d * pz, h * py, w * px
        return d, h, w


class PreActUnit(nn.Sequential):
    """BatchNorm -> ReLU -> Conv3d 3x3x3 (no bias: the next unit's BN absorbs it)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.BatchNorm3d(c_in),
            nn.ReLU(inplace=False),
            nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
        )


class PreActUNet3D(nn.Module):
    """Noh et al. pre-activation 3-D U-Net; returns logits, not probabilities."""

    def __init__(self, config: PreActUNet3DConfig | None = None) -> None:
        super().__init__()
        self.config = config or PreActUNet3DConfig()
        widths = self.config.widths
        self.stem = nn.Conv3d(self.config.in_channels, widths[0], 3, padding=1, bias=False)
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList(nn.MaxPool3d(p, stride=p) for p in self.config.pools)
        c_in = widths[0]
        for w in widths:
            self.encoders.append(nn.Sequential(PreActUnit(c_in, w), PreActUnit(w, w)))
            c_in = w
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w_skip, pool in zip(reversed(widths[:-1]), reversed(self.config.pools), strict=True):
            self.upsamplers.append(nn.ConvTranspose3d(c_in, w_skip, pool, stride=pool))
            self.decoders.append(
                nn.Sequential(PreActUnit(2 * w_skip, w_skip), PreActUnit(w_skip, w_skip))
            )
            c_in = w_skip
        self.head = nn.Sequential(
            nn.BatchNorm3d(c_in),
            nn.ReLU(inplace=False),
            nn.Conv3d(c_in, self.config.out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, in_channels, D, H, W) -> logits (N, out_channels, D, H, W), any D, H, W."""
        size_d, size_h, size_w = x.shape[2], x.shape[3], x.shape[4]
        div_d, div_h, div_w = self.config.divisor
        # Pad amounts are computed from the traced shape, so the exported
        # graph pads for whatever slice count arrives (F.pad order: W, H, D).
        x = F.pad(
            x,
            (0, (div_w - size_w % div_w) % div_w,
             0, (div_h - size_h % div_h) % div_h,
             0, (div_d - size_d % div_d) % div_d),
        )
        x = self.stem(x)
        skips: list[torch.Tensor] = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < len(self.pools):
                skips.append(x)
                x = self.pools[i](x)
        for up, decoder in zip(self.upsamplers, self.decoders, strict=True):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)[:, :, :size_d, :size_h, :size_w]


class SliceStack3D(nn.Module):
    """Serve a 3-D net through the service's 2-D layout: (slices, C, H, W) -> (slices, 1, H, W).

    The service hands every model one study as a slice stack (model card
    layout ``slices,channels,rows,columns``); this adapter makes that stack one
    3-D volume so the 3-D model needs no special case in service.inference.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        volume = x.permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, D, H, W)
        return self.net(volume)[0].permute(1, 0, 2, 3)
