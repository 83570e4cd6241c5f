"""Classify one MR image (or header) as high-b DWI, b0, ADC or something else.

This is the standard-tag classifier: DiffusionBValue (0018,9087),
DiffusionDirectionality (0018,9075) and ImageType.  Vendor-private b-value
conventions extend :func:`b_value_of`; nothing here guesses from the order of
images or series descriptions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.dataset import Dataset

DERIVED_MAP_TOKENS = frozenset({"EADC", "EXP", "EXPADC", "FA", "TRACEW_EXP"})


class ImageRole(enum.StrEnum):
    """What an image contributes to lesion segmentation."""

    DWI = "dwi"  # diffusion-weighted, trace/isotropic, b > 0
    B0 = "b0"  # diffusion sequence, b = 0
    DIRECTIONAL = "directional"  # a single gradient direction, not a trace
    ADC = "adc"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ImageClass:
    role: ImageRole
    b_value: float | None = None


def _image_type(ds: Dataset) -> tuple[str, ...]:
    value = ds.get("ImageType", None)
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).strip().upper() for v in value)


def b_value_of(ds: Dataset) -> float | None:
    """The diffusion b-value in s/mm2 from the standard attribute, or None."""
    value = ds.get("DiffusionBValue", None)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def classify_image(ds: Dataset) -> ImageClass:
    """Classify a classic MR image from its header alone."""
    image_type = _image_type(ds)
    tokens = set(image_type)
    if tokens & DERIVED_MAP_TOKENS:
        return ImageClass(ImageRole.OTHER)
    if "ADC" in tokens:
        return ImageClass(ImageRole.ADC)
    b_value = b_value_of(ds)
    if b_value is None:
        return ImageClass(ImageRole.OTHER)
    if b_value < 1.0:
        return ImageClass(ImageRole.B0, 0.0)
    directionality = str(ds.get("DiffusionDirectionality", "") or "").upper()
    if directionality in ("DIRECTIONAL", "BMATRIX"):
        return ImageClass(ImageRole.DIRECTIONAL, b_value)
    return ImageClass(ImageRole.DWI, b_value)
