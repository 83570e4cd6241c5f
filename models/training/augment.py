"""On-the-fly augmentation of model-grid DWI/ADC slices, in torch (no extra dependency).

What scanners and patients vary, and what a model must not be fooled by:

=============  =============================================================
transform      why
=============  =============================================================
rotation       head tilt in the coil (+-15 deg in plane), scale +-10 % (head size)
elastic        anatomical variation and EPI distortion (smooth displacement of
               a few pixels, drawn on a coarse grid and upsampled)
flip           left-right: strokes occur in either hemisphere
bias field     receive-coil inhomogeneity the median normalisation leaves
               (smooth multiplicative field on the DWI channel only)
gamma          vendor reconstruction and windowing differences of DWI contrast
scale          DWI gain left after normalisation; ADC calibration (a few %)
=============  =============================================================

Spatial transforms use one ``affine_grid`` + ``grid_sample`` per batch, so
image and target move together (the target is resampled linearly and stays a
soft mask).  With ``shared=True`` every slice of the batch gets the *same*
spatial transform: the batch is one stack of neighbouring slices for the
sequence models (ConvLSTM across slices, 3-D U-Net), which must stay aligned.
All randomness comes from the ``torch.Generator`` passed in, so training is
reproducible for a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class AugmentConfig:
    """Strength of each augmentation; ``AugmentConfig.off()`` disables all."""

    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    elastic_px: float = 2.5
    elastic_grid: int = 5
    elastic_p: float = 0.5
    flip_p: float = 0.5
    bias_amplitude: float = 0.2
    gamma: tuple[float, float] = (0.8, 1.25)
    dwi_scale_sd: float = 0.15
    adc_scale_sd: float = 0.04

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(
            rotate_deg=0.0, scale=(1.0, 1.0), elastic_px=0.0, elastic_p=0.0, flip_p=0.0,
            bias_amplitude=0.0, gamma=(1.0, 1.0), dwi_scale_sd=0.0, adc_scale_sd=0.0,
        )


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _spatial_grid(
    n: int, height: int, width: int, cfg: AugmentConfig, gen: torch.Generator, shared: bool
) -> torch.Tensor | None:
    """Sampling grid (n, H, W, 2) for rotation/scale/elastic, or None when identity."""
    draws = 1 if shared else n
    angle = _uniform(gen, draws, -cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180.0)
    scale = _uniform(gen, draws, cfg.scale[0], cfg.scale[1])
    elastic = torch.rand(draws, generator=gen) < cfg.elastic_p
    displacement = torch.randn(
        draws, 2, cfg.elastic_grid, cfg.elastic_grid, generator=gen
    )
    if cfg.rotate_deg == 0 and cfg.scale == (1.0, 1.0) and not (cfg.elastic_px > 0 and elastic.any()):
        return None
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(draws, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    grid = F.affine_grid(theta, [draws, 1, height, width], align_corners=False)
    if cfg.elastic_px > 0:
        # Pixels -> normalised [-1, 1] units; smooth field from a coarse lattice.
        field = F.interpolate(displacement, size=(height, width), mode="bicubic", align_corners=False)
        field = field * (cfg.elastic_px * 2.0 / max(height, width))
        field = field * elastic.view(-1, 1, 1, 1).float()
        grid = grid + field.permute(0, 2, 3, 1)
    return grid.expand(n, -1, -1, -1) if shared else grid


def _bias_field(
    n: int, height: int, width: int, amplitude: float, gen: torch.Generator
) -> torch.Tensor:
    """Smooth multiplicative field (n, 1, H, W) within about 1 +- amplitude."""
    r = torch.linspace(-1.0, 1.0, height).view(1, height, 1)
    c = torch.linspace(-1.0, 1.0, width).view(1, 1, width)
    terms = [r, c, r * c, r * r - 0.33, c * c - 0.33]
    coeffs = torch.randn(n, len(terms), generator=gen)
    field = sum(coeffs[:, i].view(n, 1, 1) * t for i, t in enumerate(terms))
    assert isinstance(field, torch.Tensor)
    peak = field.abs().amax(dim=(1, 2), keepdim=True) + 1e-6
    return (1.0 + amplitude * field / peak).unsqueeze(1)


def augment_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    gen: torch.Generator,
    cfg: AugmentConfig,
    *,
    shared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``images`` (N, 2, H, W: DWI, ADC) and ``targets`` (N, 1, H, W) together."""
    n, _, height, width = images.shape
    draws = 1 if shared else n
    grid = _spatial_grid(n, height, width, cfg, gen, shared)
    if grid is not None:
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        targets = F.grid_sample(targets, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    flip = torch.rand(draws, generator=gen) < cfg.flip_p
    if shared:
        flip = flip.expand(n)
    if flip.any():
        images = images.clone()
        targets = targets.clone()
        images[flip] = torch.flip(images[flip], dims=(-1,))
        targets[flip] = torch.flip(targets[flip], dims=(-1,))
    dwi = images[:, :1].clamp_min(0.0)
    if cfg.gamma != (1.0, 1.0):
        gamma = _uniform(gen, draws, cfg.gamma[0], cfg.gamma[1]).view(draws, 1, 1, 1)
        dwi = dwi.pow(gamma)
    if cfg.bias_amplitude > 0:
        field = _bias_field(draws, height, width, cfg.bias_amplitude, gen)
        dwi = dwi * field
    dwi_scale = torch.exp(torch.randn(draws, generator=gen) * cfg.dwi_scale_sd).view(draws, 1, 1, 1)
    adc_scale = torch.exp(torch.randn(draws, generator=gen) * cfg.adc_scale_sd).view(draws, 1, 1, 1)
    images = torch.cat([dwi * dwi_scale, images[:, 1:] * adc_scale], dim=1)
    return images.contiguous(), targets.clamp(0.0, 1.0).contiguous()
