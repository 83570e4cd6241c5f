"""Domain of validity: is this result inside the range the model was validated on?

A hospital would rather read "outside validated range" than a confident wrong
number.  Every result is checked against the acquisition range the served
model was validated on (b-value, slice spacing, coverage, SNR), the
plausibility of its ADC map, and patterns no real infarct makes (a lesion
covering a large share of the brain, a bilateral mirror-symmetric pattern such
as the cortical ribbon).  The result stays a result; :class:`DomainOfValidity`
carries the reasons to the SR, the overlay, the DB and the hold-back policy.

b-value dependence (:mod:`service.diffusion`): the ADC falls with b because brain diffusion is
not mono-exponential.  The ADC core threshold (620, a b~1000 number) and the plausible-ADC range
are scaled by :func:`~service.diffusion.adc_b_factor`, and the SR says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from service.diffusion import B1000_TOLERANCE, REFERENCE_B_VALUE, adc_b_factor
from service.domain import DiffusionStudy, DomainOfValidity, LesionSegmentation

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ValidityLimits:
    """The validated range (see :class:`service.config.ValiditySettings`)."""

    b_value_range: tuple[float, float] = (900.0, 1600.0)
    slice_spacing_range_mm: tuple[float, float] = (1.5, 7.0)
    min_coverage_mm: float = 80.0
    min_snr: float = 6.0
    adc_median_range: tuple[float, float] = (600.0, 1100.0)
    max_lesion_brain_fraction: float = 0.25
    symmetric_min_ml: float = 5.0
    symmetric_fraction: float = 0.5


def core_threshold_for_b(threshold_b1000: float, b_value: float) -> float:
    """The ADC core threshold calibrated for the acquired b-value."""
    return threshold_b1000 * adc_b_factor(b_value)


def trace_snr(dwi: npt.NDArray[np.float32], brain: npt.NDArray[np.bool_]) -> float | None:
    """Brain median of the trace over a robust noise estimate (in-plane neighbour differences).

    Background is unusable for noise (many scanners zero it), so the noise is
    taken inside the brain: the median absolute difference between in-plane
    neighbours, / (0.6745 * sqrt 2).  Anatomy adds to those differences, so
    this underestimates the SNR (a conservative figure).
    """
    both = brain[:, :, 1:] & brain[:, :, :-1]
    if both.sum() < 200:
        return None
    diffs = (dwi[:, :, 1:] - dwi[:, :, :-1])[both]
    sigma = float(np.median(np.abs(diffs - np.median(diffs)))) / (0.6745 * math.sqrt(2.0))
    signal = float(np.median(dwi[brain]))
    if sigma <= 0:
        return None
    return signal / sigma


def symmetric_fraction(mask: npt.NDArray[np.bool_], study: DiffusionStudy,
                       brain: npt.NDArray[np.bool_]) -> float:
    """Share of lesion voxels whose mirror across the brain's mid-sagittal plane is lesion too.

    The mirror plane is the patient left-right axis (LPS x) through the brain
    mask's centroid; the mirrored lesion is dilated by one voxel in-plane to
    forgive a few millimetres of head tilt.
    """
    from scipy import ndimage

    idx = np.argwhere(mask)
    if idx.size == 0:
        return 0.0
    affine = study.dwi.affine()
    inverse = np.linalg.inv(affine)
    brain_idx = np.argwhere(brain)
    centre_x = float((affine[:3, :3] @ brain_idx.mean(axis=0)[::-1] + affine[:3, 3])[0])
    points = idx[:, ::-1] @ affine[:3, :3].T + affine[:3, 3]
    points[:, 0] = 2.0 * centre_x - points[:, 0]
    mirrored = np.rint(points @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)[:, ::-1]
    shape = np.array(mask.shape)
    inside = np.all((mirrored >= 0) & (mirrored < shape), axis=1)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    dilated = ndimage.binary_dilation(mask, structure=structure)
    hits = dilated[tuple(mirrored[inside].T)]
    return float(hits.sum()) / float(idx.shape[0])


@dataclass
class _Checks:
    """What the checks of one result found so far (reasons make it outside the range)."""

    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measures: list[tuple[str, float]] = field(default_factory=list)


def assess_validity(
    study: DiffusionStudy,
    segmentation: LesionSegmentation,
    brain: npt.NDArray[np.bool_],
    limits: ValidityLimits = ValidityLimits(),
    *,
    harmonised: bool = False,
    adc_core_threshold: float = 620.0,
) -> DomainOfValidity:
    """Check one result against ``limits``; ``harmonised`` says the network saw a b1000-equivalent.

    Three groups of checks: the acquisition (b-value, slice spacing, coverage), the signal
    (SNR, ADC plausibility) and the pattern of the result (share of the brain, symmetry).
    """
    checks = _Checks()
    b = float(study.b_value)
    threshold = _check_b_value(checks, b, limits, harmonised, adc_core_threshold)
    _check_slices(checks, study, limits)
    _check_signal(checks, study, brain, limits, adc_b_factor(b))
    _check_pattern(checks, study, segmentation, brain, limits)
    validity = DomainOfValidity(
        reasons=tuple(checks.reasons), notes=tuple(checks.notes), b_value=b,
        adc_core_threshold=threshold, measures=tuple(checks.measures),
    )
    if checks.reasons:
        log.warning("result outside the validated range: %s", "; ".join(checks.reasons))
    return validity


def _check_b_value(
    checks: _Checks, b: float, limits: ValidityLimits, harmonised: bool, adc_core_threshold: float
) -> float:
    """The b-value against the validated range; returns the ADC core threshold for this b."""
    lo, hi = limits.b_value_range
    if not lo <= b <= hi:
        checks.reasons.append(f"b={b:g} s/mm2 outside the validated {lo:g}-{hi:g}")
    if harmonised and abs(b - REFERENCE_B_VALUE) > B1000_TOLERANCE:
        checks.notes.append(f"b={b:g} trace harmonised to a b=1000-equivalent (S0 exp(-1000 ADC))")
    factor = adc_b_factor(b)
    threshold = core_threshold_for_b(adc_core_threshold, b)
    if factor != 1.0:
        checks.notes.append(
            f"ADC core threshold {threshold:.0f} (620 at b=1000, scaled x{factor:.3f} for b={b:g})"
        )
    return threshold


def _check_slices(checks: _Checks, study: DiffusionStudy, limits: ValidityLimits) -> None:
    spacing = float(study.dwi.slice_spacing)
    s_lo, s_hi = limits.slice_spacing_range_mm
    checks.measures.append(("slice_spacing_mm", spacing))
    if not s_lo <= spacing <= s_hi:
        checks.reasons.append(f"slice spacing {spacing:.1f} mm outside the validated {s_lo:g}-{s_hi:g} mm")
    coverage = spacing * study.dwi.shape[0]
    checks.measures.append(("coverage_mm", coverage))
    if coverage < limits.min_coverage_mm:
        checks.reasons.append(
            f"coverage {coverage:.0f} mm < {limits.min_coverage_mm:g} mm: brain not fully covered")


def _check_signal(
    checks: _Checks, study: DiffusionStudy, brain: npt.NDArray[np.bool_], limits: ValidityLimits,
    factor: float,
) -> None:
    """SNR of the trace, and the brain's median ADC (scaled to the b-value) as a plausibility check."""
    snr = trace_snr(study.dwi.voxels, brain)
    if snr is not None:
        checks.measures.append(("snr", snr))
    if snr is None or snr < limits.min_snr:
        shown = "unknown" if snr is None else f"{snr:.1f}"
        checks.reasons.append(f"SNR {shown} < {limits.min_snr:g}")

    adc = study.adc.voxels
    with np.errstate(invalid="ignore"):
        valid = brain & np.isfinite(adc) & (adc > 0)
    a_lo, a_hi = (v * factor for v in limits.adc_median_range)
    median = float(np.median(adc[valid])) if valid.sum() >= 100 else None
    if median is not None:
        checks.measures.append(("brain_adc_median", median))
    if median is None or not a_lo <= median <= a_hi:
        shown = "unavailable" if median is None else f"{median:.0f}"
        checks.reasons.append(
            f"{study.adc_origin or 'ADC'} ADC brain median {shown} outside the plausible "
            f"{a_lo:.0f}-{a_hi:.0f} x1e-6 mm2/s"
        )


def _check_pattern(
    checks: _Checks, study: DiffusionStudy, segmentation: LesionSegmentation,
    brain: npt.NDArray[np.bool_], limits: ValidityLimits,
) -> None:
    """Results no infarct looks like: most of the brain, or mirrored across the midline."""
    lesion = np.asarray(segmentation.mask, dtype=bool)
    brain_ml = float(brain.sum()) * study.dwi.voxel_volume_ml
    lesion_ml = float(lesion.sum()) * study.dwi.voxel_volume_ml
    checks.measures.append(("brain_ml", brain_ml))
    if brain_ml > 0 and lesion_ml / brain_ml > limits.max_lesion_brain_fraction:
        checks.reasons.append(
            f"lesion covers {100 * lesion_ml / brain_ml:.0f} % of the brain "
            f"(> {100 * limits.max_lesion_brain_fraction:.0f} %): implausible"
        )
    if lesion_ml >= limits.symmetric_min_ml:
        sym = symmetric_fraction(lesion, study, brain)
        checks.measures.append(("symmetric_fraction", sym))
        if sym >= limits.symmetric_fraction:
            checks.reasons.append(
                f"bilateral symmetric pattern ({100 * sym:.0f} % mirrored across the midline): "
                "typical of cortical ribbon or artefact, not of a vascular territory"
            )
