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
* Enhanced MR DWI (b0 and b-high frames of one object at the same plane
  positions) and Siemens MOSAIC DWI (all slices tiled in one image) are not
  one image per slice; given :class:`~service.derive.references.SliceSources`
  the SEG gets explicit plane positions, orientation and pixel measures of
  the DWI slices and references the high-b frames per frame
  (ReferencedFrameNumber) or the mosaic at image level only; see
  :func:`_build_seg_on_frames`.

highdicom 0.28.2 puts the Segment Identification Sequence of a one-segment
SEG in the *shared* functional groups (valid DICOM); note that its own
``hd.sr.ReferencedSegment.from_segmentation`` then fails, which is why
``service.derive.sr`` builds the reference explicitly.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
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
from service.derive.references import (
    SliceSources,
    SourceLayout,
    functional_group_item,
    positive_number,
)
from service.derive.sources import (
    check_source_images,
    prepare_sources,
    with_patient_study_fallbacks,
)

__all__ = ["build_lesion_seg", "lesion_segment_description", "lesion_tracking_uid"]

log = logging.getLogger(__name__)

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
    source_images: Sequence[Dataset] | SliceSources,
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

    ``source_images`` may instead be :class:`~service.derive.references.SliceSources`
    (``mask[i]`` on its ``references[i]``): classic images are then handled as
    above; frames of a multi-frame object (Enhanced MR) and tiles of a Siemens
    MOSAIC as described in :func:`_build_seg_on_frames`.

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
    series = _SegSeries(
        series_number=series_number,
        instance_number=instance_number,
        series_description=series_description,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name or algorithm.name,
        software_version=software_version,
        device_serial_number=device_serial_number,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
    )
    if isinstance(source_images, SliceSources):
        if source_images.layout is not SourceLayout.CLASSIC:
            return _build_seg_on_frames(source_images, mask_bool, algorithm, series)
        source_images = [ref.dataset for ref in source_images.references]
    return _build_seg_on_images(source_images, mask_bool, algorithm, series)


@dataclass(frozen=True, slots=True)
class _SegSeries:
    """The SEG's own series, instance and equipment attributes, as the caller asked for them.

    The UIDs are None where the caller left them to us: :meth:`uids` makes
    new ones, after the sources were checked.
    """

    series_number: int
    instance_number: int
    series_description: str
    manufacturer: str
    manufacturer_model_name: str
    software_version: str
    device_serial_number: str
    series_instance_uid: str | None
    sop_instance_uid: str | None

    def uids(self, sources: Sequence[Dataset]) -> tuple[str, str]:
        """(Series, SOP Instance UID), the series new to ``sources``; checks the numbers too."""
        if self.series_number < 1 or self.instance_number < 1:
            raise ValueError("series_number and instance_number must be positive")
        series_uid = self.series_instance_uid or hd.UID()
        sop_uid = self.sop_instance_uid or hd.UID()
        if series_uid in {str(ds.SeriesInstanceUID) for ds in sources}:
            raise ValueError("the SEG must be in a new series, not the source series")
        return series_uid, sop_uid


def _build_seg_on_images(
    source_images: Sequence[Dataset],
    mask: npt.NDArray[np.bool_],
    algorithm: AlgorithmInfo,
    series: _SegSeries,
) -> hd.seg.Segmentation:
    """The SEG of ``mask`` on classic images, ``mask[i]`` on ``source_images[i]``.

    highdicom derives the frames' geometry and references from the sources;
    they are checked first and handed over repaired
    (:func:`~service.derive.sources.prepare_sources`).
    """
    if mask.shape[0] != len(source_images):
        raise ValueError(
            f"mask has {mask.shape[0]} slices but {len(source_images)} source images "
            "were given; mask[i] must correspond to source_images[i]"
        )
    check_source_images(source_images, (int(mask.shape[1]), int(mask.shape[2])))
    series_uid, sop_uid = series.uids(source_images[:1])  # one series: checked above
    seg = hd.seg.Segmentation(
        source_images=prepare_sources(source_images),
        pixel_array=mask,
        **_segmentation_arguments(algorithm, series, series_uid, sop_uid),
    )
    _log_built(seg, mask)
    return seg


def _segmentation_arguments(
    algorithm: AlgorithmInfo, series: _SegSeries, series_uid: str, sop_uid: str
) -> dict[str, Any]:
    """The ``hd.seg.Segmentation`` arguments that do not depend on the source layout."""
    return {
        "segmentation_type": hd.seg.SegmentationTypeValues.BINARY,
        "segment_descriptions": [
            lesion_segment_description(algorithm, lesion_tracking_uid(sop_uid)),
        ],
        "series_instance_uid": series_uid,
        "series_number": series.series_number,
        "sop_instance_uid": sop_uid,
        "instance_number": series.instance_number,
        "manufacturer": series.manufacturer,
        "manufacturer_model_name": series.manufacturer_model_name,
        "software_versions": series.software_version,
        "device_serial_number": series.device_serial_number,
        "content_label": _CONTENT_LABEL,
        "content_description": _CONTENT_DESCRIPTION,
        "omit_empty_frames": False,
        "series_description": series.series_description,
    }


def _log_built(seg: hd.seg.Segmentation, mask: npt.NDArray[np.bool_]) -> None:
    log.info(
        "built lesion SEG",
        extra={
            "series_instance_uid": str(seg.SeriesInstanceUID),
            "sop_instance_uid": str(seg.SOPInstanceUID),
            "frames": int(seg.NumberOfFrames),
            "lesion_voxels": int(mask.sum()),
        },
    )


# ------------------------------------------------- multi-frame and MOSAIC sources

#: What highdicom writes in a SEG's per-frame Derivation Image items.
_SEGMENTATION_DERIVATION = hd.sr.CodedConcept("113076", "DCM", "Segmentation")
_SOURCE_FOR_PROCESSING = hd.sr.CodedConcept(
    "121322", "DCM", "Source image for image processing operation"
)
#: A SEG frame is matched to its slice when its position is this close (mm).
_POSITION_MATCH_MM = 0.01


def _slice_thickness(sources: SliceSources) -> float:
    """SliceThickness of the source slices, else (logged) the slice spacing."""
    for ref in sources.references:
        if ref.frame_number is not None:
            item = functional_group_item(ref.dataset, ref.frame_number - 1, "PixelMeasuresSequence")
            thickness = positive_number(item.get("SliceThickness") if item is not None else None)
        else:
            thickness = positive_number(ref.dataset.get("SliceThickness"))
        if thickness is not None:
            return thickness
    assert sources.geometry is not None
    log.warning("source slices give no SliceThickness; using the slice spacing")
    return sources.geometry.slice_spacing


def _spacing_value(declared: object, spacing: float) -> str:
    """The declared SpacingBetweenSlices if the slice grid agrees, else the grid's."""
    value = positive_number(declared)
    if value is not None and abs(value - spacing) <= 0.01 * spacing:
        return str(declared)
    return f"{spacing:.6g}"


def _prepared_object(ds: Dataset, sources: SliceSources, thickness: float) -> Dataset:
    """A copy of a multi-frame or MOSAIC source that highdicom can build the SEG from.

    Patient/study header repaired as for classic sources; the pixel measures
    highdicom copies (shared functional groups of a multi-frame object,
    top level of a MOSAIC) set to the slices' thickness and spacing; a
    per-frame-only orientation also put in the shared groups (highdicom
    requires a shared one).  The caller's dataset is not modified.
    """
    geometry = sources.geometry
    assert geometry is not None
    fixed = with_patient_study_fallbacks(ds)
    if fixed is ds:
        fixed = copy.deepcopy(ds)
    spacing = geometry.slice_spacing
    if sources.layout is SourceLayout.MOSAIC:
        if positive_number(fixed.get("SliceThickness")) is None:
            fixed.SliceThickness = f"{thickness:.6g}"
        fixed.SpacingBetweenSlices = _spacing_value(fixed.get("SpacingBetweenSlices"), spacing)
        return fixed

    frame_index = next(
        (
            r.frame_number - 1
            for r in sources.references
            if r.frame_number is not None and r.sop_instance_uid == ds.SOPInstanceUID
        ),
        0,
    )
    shared_sequence = fixed.get("SharedFunctionalGroupsSequence", None)
    if not shared_sequence:
        fixed.SharedFunctionalGroupsSequence = [Dataset()]
    shared = fixed.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" not in shared:
        orientation = functional_group_item(fixed, frame_index, "PlaneOrientationSequence")
        assert orientation is not None  # SliceSources.from_frames checked
        shared.PlaneOrientationSequence = [copy.deepcopy(orientation)]
    source_measures = functional_group_item(fixed, frame_index, "PixelMeasuresSequence")
    assert source_measures is not None  # SliceSources.from_frames checked
    measures = Dataset()
    measures.PixelSpacing = source_measures.PixelSpacing
    measures.SliceThickness = f"{thickness:.6g}"
    measures.SpacingBetweenSlices = _spacing_value(
        source_measures.get("SpacingBetweenSlices"), spacing
    )
    shared.PixelMeasuresSequence = [measures]
    return fixed


def _frame_reference(sources: SliceSources, i: int) -> list[Dataset]:
    """Per-frame DerivationImageSequence of the SEG frame on slice ``i``.

    A frame of a multi-frame object: that frame, explicitly, with spatial
    locations preserved (the SEG frame is the source frame's plane).  A MOSAIC
    tile: nothing (type 2, empty) -- the only possible reference is the whole
    mosaic, which would tell viewers that resolve references instead of
    positions to put every frame on one image.  The mosaic is referenced at
    image level (SourceImageSequence, ReferencedSeriesSequence).
    """
    ref = sources.references[i]
    if ref.frame_number is None:
        return []
    source = Dataset()
    source.ReferencedSOPClassUID = ref.sop_class_uid
    source.ReferencedSOPInstanceUID = ref.sop_instance_uid
    source.ReferencedFrameNumber = ref.frame_number
    source.PurposeOfReferenceCodeSequence = [_SOURCE_FOR_PROCESSING]
    source.SpatialLocationsPreserved = "YES"
    derivation = Dataset()
    derivation.DerivationCodeSequence = [_SEGMENTATION_DERIVATION]
    derivation.SourceImageSequence = [source]
    return [derivation]


def _build_seg_on_frames(
    sources: SliceSources,
    mask: npt.NDArray[np.bool_],
    algorithm: AlgorithmInfo,
    series: _SegSeries,
) -> hd.seg.Segmentation:
    """The SEG of ``mask`` on frames of multi-frame objects or tiles of MOSAICs.

    highdicom 0.28.2 cannot derive the frames from such sources itself: an
    Enhanced MR DWI object holds b0 and b-high frames at the same positions
    ('Plane positions must not contain duplicates'), and a MOSAIC is one
    large image.  So it gets explicit plane positions (a frame's own, or for
    a tile the DWI grid's ``origin + k * slice_spacing * slice_cosine``),
    orientation and pixel measures, the frame size of a DWI slice, and the
    source object(s) for the patient/study header, FrameOfReferenceUID and
    the image-level references; afterwards each SEG frame's
    DerivationImageSequence is replaced by the reference to its own slice
    (:func:`_reference_own_slices`: highdicom would reference the b0 frame
    at the same position too).
    """
    geometry, frame_shape = sources.geometry, sources.frame_shape
    assert geometry is not None and frame_shape is not None
    if mask.shape[0] != len(sources):
        raise ValueError(
            f"mask has {mask.shape[0]} slices but {len(sources)} source frames were given"
        )
    if (int(mask.shape[1]), int(mask.shape[2])) != frame_shape:
        raise ValueError(
            f"mask slices are {mask.shape[1]}x{mask.shape[2]} but the source slices are "
            f"{frame_shape[0]}x{frame_shape[1]}"
        )
    series_uid, sop_uid = series.uids(sources.objects)
    thickness = _slice_thickness(sources)
    objects = [_prepared_object(ds, sources, thickness) for ds in sources.objects]
    positions = np.array([sources.frame_position(i) for i in range(len(sources))])
    patient = hd.CoordinateSystemNames.PATIENT
    seg = hd.seg.Segmentation(
        source_images=objects[:1],
        further_source_images=objects[1:] or None,
        pixel_array=mask,
        plane_positions=[
            hd.PlanePositionSequence(patient, [float(v) for v in p]) for p in positions
        ],
        plane_orientation=hd.PlaneOrientationSequence(
            patient, [*geometry.row_cosine, *geometry.column_cosine]
        ),
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=list(geometry.pixel_spacing),
            slice_thickness=thickness,
            spacing_between_slices=geometry.slice_spacing,
        ),
        **_segmentation_arguments(algorithm, series, series_uid, sop_uid),
    )
    _reference_own_slices(seg, sources, positions)
    _log_built(seg, mask)
    return seg


def _reference_own_slices(
    seg: hd.seg.Segmentation, sources: SliceSources, positions: npt.NDArray[np.float64]
) -> None:
    """Point each SEG frame's DerivationImageSequence at its own slice (:func:`_frame_reference`).

    Frames are matched to slices by plane position (highdicom may reorder
    them); every slice must get exactly one frame.
    """
    matched: set[int] = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        distances = np.linalg.norm(positions - position, axis=1)
        i = int(np.argmin(distances))
        if distances[i] > _POSITION_MATCH_MM or i in matched:
            raise ValueError("cannot match the SEG frames to the source slices by position")
        matched.add(i)
        frame.DerivationImageSequence = _frame_reference(sources, i)
    if len(matched) != len(sources):
        raise ValueError(f"the SEG has {len(matched)} frames for {len(sources)} slices")
    rebuild = getattr(seg, "_build_luts", None)
    if callable(rebuild):  # highdicom's frame look-up tables, now stale
        rebuild()
