"""Intake: understand what the scanner sent and assemble the DWI + ADC pair."""

from service.intake.classify import ImageClass, ImageRole, classify_image
from service.intake.study import group_by_study, load_study, read_dicom, resample_onto
from service.intake.volume import stack_slices

__all__ = [
    "ImageClass",
    "ImageRole",
    "classify_image",
    "group_by_study",
    "load_study",
    "read_dicom",
    "resample_onto",
    "stack_slices",
]
