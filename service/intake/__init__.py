"""Intake: understand what the scanner sent and assemble the DWI + ADC pair.

:mod:`~service.intake.classify` knows the vendors' b-value conventions,
:mod:`~service.intake.planes` cuts classic, MOSAIC and Enhanced MR objects
into slices, :mod:`~service.intake.volume` stacks them in patient space,
:mod:`~service.intake.adc` handles ADC units and computation, and
:mod:`~service.intake.study` puts a :class:`~service.domain.DiffusionStudy`
together or refuses with a reason.
"""

from service.domain import ImageRole
from service.imaging import resample_onto
from service.intake.classify import ImageClass, Vendor, classify_frame, classify_image
from service.intake.planes import ImagePlane, planes_of, stack_planes
from service.intake.reading import group_by_study, read_dicom
from service.intake.signature import signature_of
from service.intake.study import load_study
from service.intake.volume import stack_slices

__all__ = [
    "ImageClass",
    "ImagePlane",
    "ImageRole",
    "Vendor",
    "classify_frame",
    "classify_image",
    "group_by_study",
    "load_study",
    "planes_of",
    "read_dicom",
    "resample_onto",
    "signature_of",
    "stack_planes",
    "stack_slices",
]
