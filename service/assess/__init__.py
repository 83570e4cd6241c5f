"""Assess: the checks between inference and the report.

infer -> **assess** -> derive.  Two things are decided here, from the study
and the network's mask alone (no DICOM writing, no config import):

* the restricted-diffusion guard (:mod:`service.assess.guard`): which
  predicted components are lesion, and which are DWI-bright mimics;
* the domain of validity (:mod:`service.assess.validity`): whether the
  result lies inside the range the model was validated on, and why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from service.assess.guard import (
    GuardedSegmentation,
    RestrictionLimits,
    guard_restricted_diffusion,
    reference_adc,
)
from service.assess.validity import (
    ValidityLimits,
    assess_validity,
    core_threshold_for_b,
    symmetric_fraction,
    trace_snr,
)
from service.diffusion import adc_b_factor
from service.domain import DiffusionMimic, DiffusionStudy, DomainOfValidity, LesionSegmentation

__all__ = [
    "AssessOptions",
    "Assessment",
    "GuardedSegmentation",
    "RestrictionLimits",
    "ValidityLimits",
    "adc_b_factor",
    "assess",
    "assess_validity",
    "core_threshold_for_b",
    "guard_restricted_diffusion",
    "reference_adc",
    "symmetric_fraction",
    "trace_snr",
]


@dataclass(frozen=True, slots=True)
class AssessOptions:
    """What the pipeline tells the assess stage (built from ``settings.assess``)."""

    restriction: RestrictionLimits = field(default_factory=RestrictionLimits)
    validity: ValidityLimits = field(default_factory=ValidityLimits)
    adc_core_threshold: float = 620.0  # at b=1000, 1e-6 mm2/s
    harmonised: bool = False  # the model's profile feeds a b=1000-equivalent trace


@dataclass(frozen=True, slots=True, eq=False)
class Assessment:
    """The guarded segmentation, the mimics it set aside, and the domain of validity."""

    segmentation: LesionSegmentation
    mimics: tuple[DiffusionMimic, ...]
    validity: DomainOfValidity
    brain_mask: npt.NDArray[np.bool_]
    reference_adc: float | None


def assess(
    study: DiffusionStudy,
    segmentation: LesionSegmentation,
    brain: npt.NDArray[np.bool_],
    options: AssessOptions = AssessOptions(),
) -> Assessment:
    """Guard the network's mask, then check the guarded result's domain of validity."""
    guarded = guard_restricted_diffusion(segmentation, study.dwi, study.adc, brain, options.restriction)
    validity = assess_validity(
        study, guarded.segmentation, brain, options.validity,
        harmonised=options.harmonised, adc_core_threshold=options.adc_core_threshold,
    )
    return Assessment(
        segmentation=guarded.segmentation,
        mimics=guarded.mimics,
        validity=validity,
        brain_mask=brain,
        reference_adc=guarded.reference_adc,
    )
