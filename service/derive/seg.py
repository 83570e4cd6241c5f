"""The lesion mask as a DICOM Segmentation (SEG) in the source study.

One BINARY segment, "Acute ischemic lesion" (category SCT Morphologically
Abnormal Structure, type SCT Infarct), algorithm type AUTOMATIC with the
model named in its Algorithm Identification Sequence.

Design choices, and why:

* One frame per source slice, empty or not (``omit_empty_frames=False``):
  some viewers place frames wrongly when a SEG skips slices (MONAI Deploy
  SDK #397), and a study without a lesion still yields a valid SEG with an
  empty segment, so "no lesion" is an explicit, archived answer rather than a
  missing object.
* Same StudyInstanceUID and FrameOfReferenceUID as the source (highdicom
  takes them from the sources), new series; the series and SOP Instance UIDs
  may be given by the caller so that a re-send replaces instead of
  duplicating the object in PACS.
* Source headers read with ``stop_before_pixels=True`` are enough: highdicom
  0.28 needs only geometry, UIDs and patient/study attributes of the sources,
  never their pixels (checked by the tests).
* highdicom copies the patient/study modules and the pixel measures from the
  first source and crashes or writes invalid values when that source is
  sloppy; :mod:`service.derive.sources` validates the sources and hands
  highdicom repaired copies (the caller's datasets stay untouched).
* The segment carries a Tracking UID derived from the SOP Instance UID, and
  the SR reuses it, so the SR's measurement group and the SEG's segment are
  linked by tracking identity as well as by reference.

highdicom 0.28.2 puts the Segment Identification Sequence of a one-segment
SEG in the *shared* functional groups (valid DICOM); note that its own
``hd.sr.ReferencedSegment.from_segmentation`` then fails, which is why
``service.derive.sr`` builds the reference explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from service.derive.algorithm import AlgorithmInfo, algorithm_identification_sequence
from service.derive.concepts import (
    BRAIN,
    DEFAULT_DEVICE_SERIAL_NUMBER,
    DEFAULT_MANUFACTURER,
    DEFAULT_SOFTWARE_VERSION,
    INFARCT,
    LESION_CATEGORY,
    LESION_SEGMENT_LABEL,
    LESION_SEGMENT_NUMBER,
    LESION_TRACKING_ID,
    stable_uid,
)
from service.derive.sources import check_source_images, prepare_sources

__all__ = ["build_lesion_seg", "lesion_segment_description", "lesion_tracking_uid"]

logger = logging.getLogger(__name__)

#: Content Label (CS, at most 16 characters) of our SEG.
_CONTENT_LABEL = "ISCHEMIC_LESION"
_CONTENT_DESCRIPTION = "Acute ischemic lesion segmentation on diffusion MRI"


def lesion_tracking_uid(seg_sop_instance_uid: str) -> str:
    """Tracking UID of the lesion segment of the SEG with this SOP Instance UID.

    Derived rather than random so that rebuilding a SEG with the same UIDs
    (a re-send) gives a byte-for-byte equivalent segment description.
    """
    return stable_uid("lesion-tracking", seg_sop_instance_uid)


def lesion_segment_description(
    algorithm: AlgorithmInfo, tracking_uid: str
) -> hd.seg.SegmentDescription:
    """The one segment of our SEG: an automatic Infarct segment in the brain."""
    return hd.seg.SegmentDescription(
        segment_number=LESION_SEGMENT_NUMBER,
        segment_label=LESION_SEGMENT_LABEL,
        segmented_property_category=LESION_CATEGORY,
        segmented_property_type=INFARCT,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification_sequence(algorithm),
        tracking_uid=tracking_uid,
        tracking_id=LESION_TRACKING_ID,
        anatomic_regions=[BRAIN],
    )


def _as_bool_mask(mask: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """``mask`` as a bool array; integer masks must hold only 0 and 1.

    Anything else (probabilities, label maps) is refused: silently
    thresholding it here would hide a bug upstream.
    """
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError("an integer mask must contain only 0 and 1")
        return arr.astype(np.bool_)
    raise ValueError(f"mask must be boolean (or 0/1 integers), got dtype {arr.dtype}")


def build_lesion_seg(
    source_images: Sequence[Dataset],
    mask: npt.NDArray[np.bool_] | npt.NDArray[np.integer[Any]],
    *,
    algorithm: AlgorithmInfo,
    series_number: int = 9901,
    instance_number: int = 1,
    series_description: str = "Ischemic lesion (strokeseg)",
    manufacturer: str = DEFAULT_MANUFACTURER,
    manufacturer_model_name: str | None = None,
    software_version: str = DEFAULT_SOFTWARE_VERSION,
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.seg.Segmentation:
    """Build the BINARY lesion SEG for ``mask`` on ``source_images``.

    ``mask`` has shape (slices, rows, columns) and ``mask[i]`` lies on
    ``source_images[i]`` (classic single-frame images of one series; headers
    read with ``stop_before_pixels=True`` suffice).  The sources need not be
    sorted: highdicom orders the frames by position and keeps each frame's
    reference to its own source image.

    ``manufacturer_model_name`` defaults to the algorithm name.

    Raises
    ------
    ValueError
        If the mask is not 3-D boolean, its shape does not match the sources,
        or the sources are not one series with usable geometry.
    """
    mask_bool = _as_bool_mask(mask)
    if mask_bool.ndim != 3:
        raise ValueError(f"mask must be 3-D (slices, rows, columns), got shape {mask_bool.shape}")
    if mask_bool.shape[0] != len(source_images):
        raise ValueError(
            f"mask has {mask_bool.shape[0]} slices but {len(source_images)} source images "
            "were given; mask[i] must correspond to source_images[i]"
        )
    check_source_images(source_images, (int(mask_bool.shape[1]), int(mask_bool.shape[2])))
    if series_number < 1 or instance_number < 1:
        raise ValueError("series_number and instance_number must be positive")

    series_uid = series_instance_uid or hd.UID()
    sop_uid = sop_instance_uid or hd.UID()
    if series_uid == str(source_images[0].SeriesInstanceUID):
        raise ValueError("the SEG must be in a new series, not the source series")

    sources = prepare_sources(source_images)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask_bool,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            lesion_segment_description(algorithm, lesion_tracking_uid(sop_uid)),
        ],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name or algorithm.name,
        software_versions=software_version,
        device_serial_number=device_serial_number,
        content_label=_CONTENT_LABEL,
        content_description=_CONTENT_DESCRIPTION,
        omit_empty_frames=False,
        series_description=series_description,
    )
    logger.info(
        "built lesion SEG",
        extra={
            "series_instance_uid": series_uid,
            "sop_instance_uid": sop_uid,
            "frames": int(seg.NumberOfFrames),
            "lesion_voxels": int(mask_bool.sum()),
        },
    )
    return seg
