"""A received instance's signature: what it contributes, from its header alone.

Computed by the SCP at receive time (cheap: no pixel data) and stored with the
instance so the assembler can decide, content-aware, that a study is complete.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset

from service.domain import InstanceSignature
from service.intake.classify import classify_image

log = logging.getLogger(__name__)


def signature_of(ds: Dataset) -> InstanceSignature:
    """Role, b-value and position along the slice normal; never raises."""
    series = str(ds.get("SeriesInstanceUID", ""))
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 or "MOSAIC" in [str(v).upper() for v in ds.get("ImageType", [])]:
            return InstanceSignature(series, frames=max(frames, 2))
        cls = classify_image(ds)
        position = None
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            # plain floats, not numpy: this runs once per C-STORE, before Success
            rx, ry, rz, cx, cy, cz = (float(v) for v in ds.ImageOrientationPatient)
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            position = x * (ry * cz - rz * cy) + y * (rz * cx - rx * cz) + z * (rx * cy - ry * cx)
        return InstanceSignature(series, role=cls.role, b_value=cls.b_value, slice_position=position)
    except Exception as exc:  # an odd header must never stop a store
        log.debug("no signature for an instance: %s", type(exc).__name__)
        return InstanceSignature(series)
