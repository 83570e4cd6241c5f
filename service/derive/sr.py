"""The lesion volume as a TID 1500 Measurement Report (Comprehensive 3D SR).

Why an SR next to the SEG: PACS, RIS and registries read numbers from SR
(TID 1500 is what dose/measurement pipelines and "AI results" displays
understand), not from SEG pixels.  The report contains:

* observer context: the device (our installation, with the algorithm as its
  model name); the document is COMPLETE and FINAL for this run but
  UNVERIFIED, since no person has attested the result;
* procedure reported: LOINC 24590-2 "Brain MRI" (as listed in DICOM CID 646);
* one Volumetric ROI group (TID 1411) with a Tracking Identifier (the same
  Tracking UID as the SEG segment), a reference to segment 1 of the SEG and
  its source images, finding category/type Morphologically Abnormal
  Structure / Infarct, the algorithm (TID 4019, once for the whole group
  rather than repeated under the measurement), the measurement SCT Volume
  in UCUM mL, and a qualitative evaluation "Presence of property" =
  Present/Absent.  A study without a lesion gets the same report with volume
  0 mL and "Absent", so "no lesion detected" is an explicit, coded answer;
* evidence: every source image and the SEG (highdicom requires every
  referenced instance to be listed).

:func:`read_lesion_volume_ml` parses the volume back out of a written SR,
for tests and end-to-end checks of what actually reached PACS.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from service.derive.algorithm import AlgorithmInfo, sr_algorithm_identification
from service.derive.concepts import (
    ABSENT,
    BRAIN_MRI,
    DEFAULT_DEVICE_SERIAL_NUMBER,
    DEFAULT_MANUFACTURER,
    DEFAULT_SOFTWARE_VERSION,
    INFARCT,
    LESION_CATEGORY,
    LESION_SEGMENT_NUMBER,
    LESION_TRACKING_ID,
    MILLILITER,
    PRESENCE_OF_PROPERTY,
    PRESENT,
    VOLUME,
    device_observer_uid,
)
from service.derive.seg import lesion_tracking_uid
from service.derive.sources import with_patient_study_fallbacks

__all__ = ["build_volume_report", "read_lesion_volume_ml"]

logger = logging.getLogger(__name__)

_LABELMAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

#: Factors from UCUM volume units to millilitres, for reading SRs back.
_TO_ML = {"mL": 1.0, "ml": 1.0, "cm3": 1.0, "mm3": 1e-3, "L": 1e3, "l": 1e3}


def _segment_tracking_uid(seg: Dataset) -> str:
    """The lesion segment's Tracking UID in ``seg``, or the one we would have given it."""
    for item in seg.get("SegmentSequence", []):
        if int(item.SegmentNumber) == LESION_SEGMENT_NUMBER and "TrackingUID" in item:
            return str(item.TrackingUID)
    return lesion_tracking_uid(str(seg.SOPInstanceUID))


def _check_seg(seg: Dataset, source_images: Sequence[Dataset]) -> None:
    """Raise ``ValueError`` unless ``seg`` is a SEG of these sources with segment 1."""
    if str(seg.get("SOPClassUID", "")) not in (SegmentationStorage, _LABELMAP_SEGMENTATION_STORAGE):
        raise ValueError("seg is not a Segmentation Storage instance")
    numbers = {int(item.SegmentNumber) for item in seg.get("SegmentSequence", [])}
    if LESION_SEGMENT_NUMBER not in numbers:
        raise ValueError(f"seg has no segment {LESION_SEGMENT_NUMBER}")
    if len(source_images) == 0:
        raise ValueError("at least one source image is required")
    study_uids = {str(ds.StudyInstanceUID) for ds in source_images}
    if study_uids != {str(seg.StudyInstanceUID)}:
        raise ValueError("seg and source images must belong to the same study")


def _referenced_segment(seg: Dataset, source_images: Sequence[Dataset]) -> hd.sr.ReferencedSegment:
    """Reference to segment 1 of ``seg`` and the images it was derived from.

    Built explicitly: ``hd.sr.ReferencedSegment.from_segmentation`` in
    highdicom 0.28.2 looks for the Segment Identification Sequence only in
    the per-frame functional groups, but highdicom itself writes it in the
    shared functional groups when a SEG has a single segment, so the
    convenience constructor fails on highdicom's own output.
    """
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=LESION_SEGMENT_NUMBER,
        source_images=[
            hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=str(ds.SOPClassUID),
                referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            )
            for ds in source_images
        ],
    )


def build_volume_report(
    seg: hd.seg.Segmentation | Dataset,
    source_images: Sequence[Dataset],
    lesion_volume_ml: float,
    *,
    algorithm: AlgorithmInfo,
    series_number: int = 9902,
    instance_number: int = 1,
    series_description: str = "Ischemic lesion volume (strokeseg)",
    manufacturer: str = DEFAULT_MANUFACTURER,
    manufacturer_model_name: str | None = None,
    software_version: str = DEFAULT_SOFTWARE_VERSION,
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    finding_site: Code | hd.sr.CodedConcept | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report of ``lesion_volume_ml`` for segment 1 of ``seg``.

    ``source_images`` are the images ``seg`` was derived from (headers are
    enough); they and ``seg`` become the SR's evidence.  ``lesion_volume_ml``
    may be 0.0 (no lesion): the report is still written, with "Absent".
    ``finding_site`` (e.g. a vascular territory) is optional.

    Raises
    ------
    ValueError
        If the volume is negative or not finite, or ``seg`` is not a SEG of
        the sources' study with a segment 1.
    """
    volume = float(lesion_volume_ml)
    if not math.isfinite(volume) or volume < 0.0:
        raise ValueError(f"lesion_volume_ml must be a finite number >= 0, got {lesion_volume_ml!r}")
    _check_seg(seg, source_images)
    if series_number < 1 or instance_number < 1:
        raise ValueError("series_number and instance_number must be positive")

    series_uid = series_instance_uid or hd.UID()
    sop_uid = sop_instance_uid or hd.UID()
    if series_uid in (str(seg.SeriesInstanceUID), str(source_images[0].SeriesInstanceUID)):
        raise ValueError("the SR must be in its own series, not the SEG's or the source series")

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DCM.Device),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(manufacturer, device_serial_number),
            name=manufacturer,
            manufacturer_name=manufacturer,
            model_name=manufacturer_model_name or algorithm.name,
            serial_number=device_serial_number,
        ),
    )
    algorithm_id = sr_algorithm_identification(algorithm)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_segment_tracking_uid(seg),
            identifier=LESION_TRACKING_ID,
        ),
        referenced_segment=_referenced_segment(seg, source_images),
        finding_type=INFARCT,
        finding_category=LESION_CATEGORY,
        algorithm_id=algorithm_id,
        finding_sites=(
            [hd.sr.FindingSite(anatomic_location=finding_site)]
            if finding_site is not None
            else None
        ),
        measurements=[
            hd.sr.Measurement(
                name=VOLUME,
                value=volume,
                unit=MILLILITER,
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=PRESENCE_OF_PROPERTY,
                value=PRESENT if volume > 0.0 else ABSENT,
            )
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=BRAIN_MRI,
        imaging_measurements=[group],
    )
    # evidence[0] supplies the SR's patient/study modules (and the acquisition
    # equipment listed as contributing equipment), hence the patched source first.
    evidence = [with_patient_study_fallbacks(source_images[0]), *source_images[1:], seg]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        # Final: this run will not revise it; UNVERIFIED says no person attested it.
        is_final=True,
        is_verified=False,
        series_description=series_description,
        manufacturer_model_name=manufacturer_model_name or algorithm.name,
        software_versions=software_version,
        device_serial_number=device_serial_number,
    )
    logger.info(
        "built lesion volume SR",
        extra={
            "series_instance_uid": series_uid,
            "sop_instance_uid": sop_uid,
            "seg_sop_instance_uid": str(seg.SOPInstanceUID),
            "lesion_volume_ml": volume,
        },
    )
    return sr


def read_lesion_volume_ml(sr_dataset: Dataset) -> float:
    """The infarct volume in mL from a TID 1500 SR written by :func:`build_volume_report`.

    Parses with highdicom (what any TID 1500 consumer would see), picks the
    one volumetric group whose finding type is Infarct and its one Volume
    measurement, and converts UCUM volume units to mL.

    Raises
    ------
    ValueError
        If the dataset is not such a report, or holds zero or several infarct
        volumes, or an unknown unit.
    """
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(sr_dataset, copy=True)
    except (AttributeError, ValueError) as exc:
        raise ValueError(f"not a readable SR document: {exc}") from exc
    content = sr.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError("SR is not a TID 1500 Measurement Report")
    groups = content.get_volumetric_roi_measurement_groups(finding_type=INFARCT)
    volumes = [m for g in groups for m in g.get_measurements(name=VOLUME)]
    if len(volumes) != 1:
        raise ValueError(f"expected exactly one infarct volume in the SR, found {len(volumes)}")
    measurement = volumes[0]
    unit = measurement.unit
    if unit.scheme_designator != "UCUM" or unit.value not in _TO_ML:
        raise ValueError(
            f"unexpected unit for the infarct volume: {unit.value} ({unit.scheme_designator})"
        )
    return float(measurement.value) * _TO_ML[unit.value]
