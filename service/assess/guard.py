"""The restricted-diffusion guard: only DWI-bright *and* ADC-dark components are lesion.

An acute ischaemic lesion restricts water diffusion: it is bright on the
high-b trace and dark on the ADC map.  A network sees both channels but can
still call a DWI-bright region lesion when its ADC is normal (T2
shine-through, chronic or subacute lesions, susceptibility pile-up, EPI
ghosts, a bright cortical ribbon at high b).  On real healthy scans that was
the whole false-positive volume (25-120 mL, every component with a relative
ADC of 0.88-1.24).  This guard applies the physics after the network:

* nothing outside the brain mask ever counts;
* each remaining 26-connected component counts only if its mean ADC is below
  an absolute limit **and** below a limit relative to the normal-appearing
  brain (rADC), and not implausibly low for tissue: fat (a fat-suppression
  failure on the scalp or orbit, ADC ~0-150) and fit failures are bright on
  DWI with an ADC no infarct has (acute cores bottom out at ~250-300).  The reference is the median ADC of brain voxels that are
  neither predicted lesion nor fluid (ADC < 1500 x 1e-6 mm2/s), which is
  grey and white matter whatever the scanner's calibration.

Components that fail are returned as :class:`~service.domain.DiffusionMimic`
with their reason, for the SR; they are excluded from the lesion volume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from service.domain import DiffusionMimic, ImageVolume, LesionSegmentation

log = logging.getLogger(__name__)

#: ADC above this (1e-6 mm2/s) is CSF or other fluid, not parenchyma.
FLUID_ADC = 1500.0
#: Mimics smaller than this (mL) are dropped without being listed (single noisy voxels).
MIN_LISTED_MIMIC_ML = 0.05
_MIN_REFERENCE_VOXELS = 200


@dataclass(frozen=True, slots=True)
class RestrictionLimits:
    """Limits of the guard (see :class:`service.config.RestrictionGuardSettings`)."""

    max_mean_adc: float = 750.0
    max_relative_adc: float = 0.85
    enabled: bool = True
    min_mean_adc: float = 200.0

    def __post_init__(self) -> None:
        if not (self.max_mean_adc > 0 and self.max_relative_adc > 0):
            raise ValueError("restriction limits must be positive")
        if not 0 <= self.min_mean_adc < self.max_mean_adc:
            raise ValueError("min_mean_adc must lie in [0, max_mean_adc)")


@dataclass(frozen=True, slots=True, eq=False)
class GuardedSegmentation:
    """The segmentation after the guard, what it removed, and the reference ADC used."""

    segmentation: LesionSegmentation
    mimics: tuple[DiffusionMimic, ...]
    reference_adc: float | None


def reference_adc(
    adc: npt.NDArray[np.float32], brain: npt.NDArray[np.bool_], lesion: npt.NDArray[np.bool_]
) -> float | None:
    """Median ADC of normal-appearing parenchyma (brain, not lesion, not fluid, valid)."""
    with np.errstate(invalid="ignore"):
        normal = brain & ~lesion & np.isfinite(adc) & (adc > 0) & (adc < FLUID_ADC)
    values = adc[normal]
    if values.size < _MIN_REFERENCE_VOXELS:
        return None
    return float(np.median(values))


def _component_mimic(
    component: npt.NDArray[np.bool_],
    adc: npt.NDArray[np.float32],
    dwi: ImageVolume,
    reason: str,
    mean_adc: float | None,
    relative: float | None,
) -> DiffusionMimic:
    indices = np.argwhere(component)
    affine = dwi.affine()
    # affine maps (column, row, slice); indices are (slice, row, column)
    centroid = affine[:3, :3] @ indices.mean(axis=0)[::-1] + affine[:3, 3]
    return DiffusionMimic(
        volume_ml=float(indices.shape[0]) * dwi.voxel_volume_ml,
        mean_adc=mean_adc,
        relative_adc=relative,
        centroid_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        first_slice=int(indices[:, 0].min()),
        last_slice=int(indices[:, 0].max()),
        reason=reason,
    )


def guard_restricted_diffusion(
    segmentation: LesionSegmentation,
    dwi: ImageVolume,
    adc: ImageVolume,
    brain: npt.NDArray[np.bool_],
    limits: RestrictionLimits = RestrictionLimits(),
) -> GuardedSegmentation:
    """Keep only the components of ``segmentation.mask`` that show restricted diffusion.

    ``adc`` lies on the DWI grid in 1e-6 mm2/s; ``brain`` is the brain mask on
    the same grid.  With ``limits.enabled`` false only the brain-mask rule
    applies (nothing outside the brain is ever lesion).
    """
    mask = np.asarray(segmentation.mask, dtype=bool)
    if mask.shape != brain.shape or adc.shape != dwi.shape or mask.shape != dwi.shape:
        raise ValueError("segmentation, brain mask, DWI and ADC must share one grid")
    values = adc.voxels
    structure = np.ones((3, 3, 3), dtype=bool)
    voxel_ml = dwi.voxel_volume_ml
    mimics: list[DiffusionMimic] = []

    outside = mask & ~brain
    if outside.any():
        labels, n = ndimage.label(outside, structure=structure)
        for i in range(1, n + 1):
            component = labels == i
            if component.sum() * voxel_ml >= MIN_LISTED_MIMIC_ML:
                mimics.append(_component_mimic(component, values, dwi, "outside the brain", None, None))
    inside = mask & brain
    reference = reference_adc(values, brain, inside)
    kept = inside.copy()
    if limits.enabled and inside.any():
        labels, n = ndimage.label(inside, structure=structure)
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(values) & (values > 0)
        flat = labels.ravel()  # per-component sums by bincount: ndimage.sum per index is slower
        sums = np.bincount(flat, weights=np.where(valid, values, 0.0).ravel(), minlength=n + 1)[1:]
        counts = np.bincount(flat, weights=valid.ravel().astype(np.float64), minlength=n + 1)[1:]
        for i, (total, count) in enumerate(zip(sums, counts, strict=True), start=1):
            mean = float(total / count) if count else None
            relative = mean / reference if (mean is not None and reference) else None
            problems = []
            if mean is None:
                problems.append("no valid ADC")
            else:
                if mean >= limits.max_mean_adc:
                    problems.append(f"mean ADC {mean:.0f} >= {limits.max_mean_adc:g}")
                if mean < limits.min_mean_adc:
                    problems.append(f"mean ADC {mean:.0f} < {limits.min_mean_adc:g}: fat or fit failure, not tissue")
                if relative is not None and relative >= limits.max_relative_adc:
                    problems.append(f"rADC {relative:.2f} >= {limits.max_relative_adc:g}")
            if not problems:
                continue
            component = labels == i
            kept &= ~component
            if component.sum() * voxel_ml >= MIN_LISTED_MIMIC_ML:
                what = (
                    "DWI hyperintensity with implausibly low ADC"
                    if mean is not None and mean < limits.min_mean_adc
                    else "DWI hyperintensity without restricted diffusion"
                )
                reason = f"{what} (" + ", ".join(problems) + ")"
                mimics.append(_component_mimic(component, values, dwi, reason, mean, relative))
    mimics.sort(key=lambda m: -m.volume_ml)
    volume = float(kept.sum()) * voxel_ml
    if mimics:
        log.info(
            "restricted-diffusion guard: kept %.2f mL, set aside %d component(s) of %.2f mL",
            volume, len(mimics), sum(m.volume_ml for m in mimics),
        )
    guarded = replace(segmentation, mask=kept, lesion_volume_ml=volume)
    return GuardedSegmentation(segmentation=guarded, mimics=tuple(mimics), reference_adc=reference)
