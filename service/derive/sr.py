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
* evidence: every source object and the SEG (highdicom requires every
  referenced instance to be listed).  Where the DWI slices are frames of an
  Enhanced MR object, the IMAGE references carry the frame numbers of the
  slices (the high-b frames); a Siemens MOSAIC is referenced as a whole.

Given :class:`~service.derive.findings.LesionFindings` (optional, so callers
that only know the volume keep working), the report says more; every
definition is in :mod:`service.derive.findings`:

* the lesion group (above) also holds the **lesion count** (SCT "Number of
  lesions", UCUM "1", method 99STROKESEG CC3D26 "3-D connected components,
  26-connectivity"), the **mean ADC** in the lesion (DCM "Apparent Diffusion
  Coefficient", derivation SCT "Mean", UCUM ``um2/s`` = 1e-6 mm2/s), and the
  **quality items**: mean lesion probability and the borderline-voxel
  fraction (99STROKESEG codes, UCUM "1") and the input-quality flag as TEXT
  (DCM "Image Quality");
* **one TID 1411 group per lesion** ("Lesion k of n", numbered by decreasing
  volume, at most ``max_itemised_lesions``; the rest are counted and noted
  in a Comment).  The SEG has one segment for all lesions, so a per-lesion
  group cannot reference "its" segment without claiming the whole segment's
  volume; its ROI is instead a SCOORD3D POINT at the lesion's **centroid**
  (patient mm, the sources' frame of reference) with geometric purpose DCM
  "Center of Mass", and the source images it spans.  It holds the lesion's
  **volume** (mL), mean ADC, **volume class** (DCM "Size Descriptor" =
  SCT Small/Medium/Large, cut-offs 1.7 and 14 mL) and its **slice range** as
  TEXT ("InstanceNumber a to b; slice index i to j of n");
* one TID 1501 group **"ADC core"**: the volume of ADC < 620 um2/s inside
  the brain mask, in clusters of at least ``derive.core_min_cluster_ml``
  (finding Infarct, method 99STROKESEG ADCLT620, site Brain; a Comment
  states the cluster rule), independent of the model's mask; with ``core_volume_cutoffs_ml`` also one
  Yes/No item per cut-off, "ADC core volume below 21 mL (volume comparison
  only)", and a Comment saying that these compare volumes and are not
  treatment advice;
* model name/version and preprocessing profile: TID 4019 Algorithm
  Identification (profile as the parameter ``preprocessing_profile=...``);
* the **domain of validity** (:class:`~service.domain.DomainOfValidity`,
  when the findings carry one), as the *first* group of Imaging Measurements,
  before any number it qualifies: a TID 1501 group "Domain of validity" with
  the Yes/No item 99STROKESEG WITHINRANGE "Result within the algorithm's
  validated range" (SCT Yes/No), the one-line statement as TEXT
  (99STROKESEG VALIDITY: "within the model's validated range" or
  "OUTSIDE VALIDATED RANGE: <reasons>"), one TEXT per reason (RANGEREASON),
  the notes (VALIDITYNOTE: b-value harmonisation, calibrated ADC core
  threshold) and the checked measures as "name=value" (VALIDITYMEASURE);
* **one TID 1411 group per component the restricted-diffusion guard set
  aside** ("DWI hyperintensity without restricted diffusion k of n": T2
  shine-through, subacute/chronic lesion or artefact), built like a lesion
  group (centre-of-mass point, source images, slice range, volume, mean ADC)
  plus rADC (99STROKESEG RADC, UCUM "1") and the reason (TEXT NOTCOUNTED),
  with finding type 99STROKESEG DWIMIMIC instead of Infarct, so that it is
  in neither the lesion volume nor the count; a Comment in the lesion group
  says how many there are and their volume.

Private codes (99STROKESEG, see :mod:`service.derive.concepts`) are declared
in the CodingSchemeIdentificationSequence.

:func:`read_lesion_volume_ml` parses the volume back out of a written SR and
:func:`read_lesion_findings` everything else, for tests and end-to-end checks
of what actually reached PACS.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from highdicom.sr.templates import Template
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from service.derive.algorithm import AlgorithmInfo, sr_algorithm_identification
from service.derive.concepts import (
    ABSENT,
    APPARENT_DIFFUSION_COEFFICIENT,
    BRAIN,
    BRAIN_MRI,
    CENTER_OF_MASS,
    COMMENT,
    CONNECTED_COMPONENTS_26,
    DEFAULT_DEVICE_SERIAL_NUMBER,
    DEFAULT_MANUFACTURER,
    DEFAULT_SOFTWARE_VERSION,
    DOMAIN_OF_VALIDITY,
    DWI_MIMIC,
    IMAGE_QUALITY,
    INFARCT,
    LESION_CATEGORY,
    LESION_SEGMENT_NUMBER,
    LESION_TRACKING_ID,
    MEAN,
    MEAN_LESION_PROBABILITY,
    MILLILITER,
    NO,
    NO_UNITS,
    NOT_COUNTED_REASON,
    NUMBER_OF_LESIONS,
    OUTSIDE_RANGE_REASON,
    PRESENCE_OF_PROPERTY,
    PRESENT,
    PRIVATE_SCHEME,
    RELATIVE_ADC,
    SIZE_DESCRIPTOR,
    SIZE_VALUES,
    SLICE_RANGE,
    UM2_PER_S,
    VALIDITY_MEASURE,
    VALIDITY_NOTE,
    VOLUME,
    WITHIN_VALIDATED_RANGE,
    YES,
    adc_core_method_code,
    borderline_fraction_code,
    core_volume_below_code,
    device_observer_uid,
    private_coding_scheme,
    stable_uid,
)
from service.derive.findings import Lesion, LesionFindings
from service.derive.references import SliceSources, SourceLayout, as_slice_sources
from service.derive.seg import lesion_tracking_uid
from service.derive.sources import with_patient_study_fallbacks
from service.domain import DiffusionMimic, DomainOfValidity

__all__ = [
    "CORE_VOLUME_DISCLAIMER",
    "ReportedFindings",
    "ReportedLesion",
    "ReportedMimic",
    "build_volume_report",
    "read_lesion_findings",
    "read_lesion_volume_ml",
]

log = logging.getLogger(__name__)

_LABELMAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

#: Factors from UCUM volume units to millilitres, for reading SRs back.
_TO_ML = {"mL": 1.0, "ml": 1.0, "cm3": 1.0, "mm3": 1e-3, "L": 1e3, "l": 1e3}

#: Comment next to the core-volume comparisons, in every report that has them.
CORE_VOLUME_DISCLAIMER = (
    "Volume comparisons only: the ADC core volume (ADC below {threshold} um2/s in the "
    "brain) is compared with the core-volume cut-offs used by the DAWN (21, 31, 51 mL) and "
    "DEFUSE-3 (70 mL) trials. The trials' criteria also depend on age, NIHSS, perfusion "
    "imaging and time, which this device does not assess. This is not treatment advice."
)
_CORE_COMMENT = (
    "Volume of ADC below {threshold} um2/s inside the brain mask, independent of the "
    "lesion segmentation; {clusters}"
)
_CORE_CLUSTERS = (
    "only clusters of at least {min_ml} mL (6-connected voxels) count, so isolated voxels "
    "from noise or partial volume are not core."
)
_CORE_NO_CLUSTERS = "every voxel counts; isolated voxels from noise or partial volume are not removed."
_SIZE_COMMENT = (
    "Size Descriptor per lesion by volume: Small below 1.7 mL, Medium 1.7 to 14 mL, "
    "Large above 14 mL. Lesions are 3-D connected components of the segment "
    "(26-connectivity)."
)
#: Tracking Identifier of the domain-of-validity group (the first measurement group).
VALIDITY_TRACKING_ID = "Domain of validity"
#: Tracking Identifier of the k-th set-aside component.
_MIMIC_TRACKING_ID = "DWI hyperintensity without restricted diffusion {k} of {n}"
_MIMIC_COMMENT = (
    "{n} DWI-bright component{s} without restricted diffusion (T2 shine-through, subacute or "
    "chronic lesion, or artefact), {ml} mL in all, {verb} listed separately and not counted in "
    "the lesion volume or the lesion count."
)
_SLICE_RANGE_TEXT = "{kind} {a} to {b}; slice index {i} to {j} of {n}"
#: Reads every version written: "unknown" came from releases before frames and tiles were named.
_SLICE_RANGE_RE = re.compile(
    r"(InstanceNumber|frame|MOSAIC tile) (\d+|unknown) to (\d+|unknown); "
    r"slice index (\d+) to (\d+) of (\d+)"
)
_Group = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)
#: Relative tolerance between the job's lesion volume and the findings' total.
_VOLUME_RTOL = 1e-3


def _segment_tracking_uid(seg: Dataset) -> str:
    """The lesion segment's Tracking UID in ``seg``, or the one we would have given it."""
    for item in seg.get("SegmentSequence", []):
        if int(item.SegmentNumber) == LESION_SEGMENT_NUMBER and "TrackingUID" in item:
            return str(item.TrackingUID)
    return lesion_tracking_uid(str(seg.SOPInstanceUID))


def _check_seg(seg: Dataset, sources: SliceSources) -> None:
    """Raise ``ValueError`` unless ``seg`` is a SEG of these sources with segment 1."""
    if str(seg.get("SOPClassUID", "")) not in (SegmentationStorage, _LABELMAP_SEGMENTATION_STORAGE):
        raise ValueError("seg is not a Segmentation Storage instance")
    numbers = {int(item.SegmentNumber) for item in seg.get("SegmentSequence", [])}
    if LESION_SEGMENT_NUMBER not in numbers:
        raise ValueError(f"seg has no segment {LESION_SEGMENT_NUMBER}")
    study_uids = {str(ds.StudyInstanceUID) for ds in sources.objects}
    if study_uids != {str(seg.StudyInstanceUID)}:
        raise ValueError("seg and source images must belong to the same study")


def _referenced_segment(seg: Dataset, sources: SliceSources) -> hd.sr.ReferencedSegment:
    """Reference to segment 1 of ``seg`` and the images it was derived from.

    One IMAGE item per source object; a multi-frame object's item lists the
    frames the mask lies on (the high-b frames, not the b0 ones), a MOSAIC's
    refers to the whole mosaic.

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
        source_images=sources.sr_source_images(),
    )


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    """A TEXT qualitative evaluation / comment (TID 1501/1411 allow TEXT next to CODE)."""
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _append(group: Template, items: Sequence[hd.sr.ContentItem]) -> None:
    """Append content items to a measurement group's CONTAINER.

    highdicom's group constructors take only coded qualitative evaluations;
    TEXT items go after them, where the templates list them.
    """
    if items:
        group[0].ContentSequence.extend(items)


def _slice_range_text(first_slice: int, last_slice: int, sources: SliceSources) -> str:
    """A component's slices as a reader finds them in the source: InstanceNumbers of
    classic images, frame numbers (1-based) of an Enhanced MR object, tile numbers
    (1-based) of a Siemens MOSAIC; and always the 0-based slice index into the mask."""
    span = range(first_slice, last_slice + 1)
    refs = [sources.references[k] for k in span]
    numbers: list[int | None]
    if sources.layout is SourceLayout.MULTIFRAME:
        kind, numbers = "frame", [r.frame_number for r in refs]
    elif sources.layout is SourceLayout.MOSAIC:
        kind = "MOSAIC tile"
        numbers = [None if r.mosaic_index is None else r.mosaic_index + 1 for r in refs]
    else:
        kind, numbers = "InstanceNumber", [sources.instance_number(k) for k in span]
    known = [n for n in numbers if n is not None]
    a, b = (str(min(known)), str(max(known))) if known and len(known) == len(numbers) else ("unknown",) * 2
    return _SLICE_RANGE_TEXT.format(kind=kind, a=a, b=b, i=first_slice, j=last_slice, n=len(sources))


def _check_findings(findings: LesionFindings, volume: float, sources: SliceSources) -> None:
    """Raise ``ValueError`` unless ``findings`` belong to this volume and these sources."""
    if findings.shape[0] != len(sources):
        raise ValueError(
            f"findings are for {findings.shape[0]} slices but {len(sources)} source "
            "images were given"
        )
    frame_shape = sources.frame_shape  # a MOSAIC's Rows/Columns are not a slice's
    first = sources.first
    if frame_shape is None and "Rows" in first and "Columns" in first:
        frame_shape = (int(first.Rows), int(first.Columns))
    if frame_shape is not None and frame_shape != findings.shape[1:]:
        raise ValueError("findings were computed on another image size than the sources")
    if any(m.last_slice >= len(sources) for m in findings.mimics):
        raise ValueError("a set-aside component lies on slices beyond the source images")
    if not math.isclose(findings.total_volume_ml, volume, rel_tol=_VOLUME_RTOL, abs_tol=1e-9):
        raise ValueError(
            f"findings give a lesion volume of {findings.total_volume_ml} mL but the report "
            f"was asked for {volume} mL; they must describe the same mask"
        )


def _lesion_group(
    lesion: Lesion,
    count: int,
    main_tracking_uid: str,
    sources: SliceSources,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 for one lesion: a centre-of-mass point ROI and the lesion's numbers."""
    measurements = [hd.sr.Measurement(name=VOLUME, value=lesion.volume_ml, unit=MILLILITER)]
    if lesion.mean_adc is not None:
        measurements.append(
            hd.sr.Measurement(
                name=APPARENT_DIFFUSION_COEFFICIENT,
                value=lesion.mean_adc,
                unit=UM2_PER_S,
                derivation=MEAN,
            )
        )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid("lesion-component", main_tracking_uid, str(lesion.number)),
            identifier=f"Lesion {lesion.number} of {count}",
        ),
        referenced_volume_surface=hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray([lesion.centroid_mm], dtype=np.float64),
            frame_of_reference_uid=str(sources.first.FrameOfReferenceUID),
            source_images=sources.sr_source_images(lesion.first_slice, lesion.last_slice + 1),
        ),
        geometric_purpose=CENTER_OF_MASS,
        finding_type=INFARCT,
        finding_category=LESION_CATEGORY,
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=SIZE_DESCRIPTOR, value=SIZE_VALUES[lesion.volume_class.value]
            )
        ],
    )
    _append(group, [_text(SLICE_RANGE, _slice_range_text(lesion.first_slice, lesion.last_slice, sources))])
    return group


def _validity_group(
    validity: DomainOfValidity,
    main_tracking_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 stating whether the result lies inside the algorithm's validated range.

    It is the first measurement group, so a reader (or a viewer rendering the
    tree in order) meets the statement before any number it qualifies.  The
    coded Yes/No answer is for machines; the TEXT summary, one TEXT per reason,
    the notes and the checked measures are for the radiologist.
    """
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid("domain-of-validity", main_tracking_uid),
            identifier=VALIDITY_TRACKING_ID,
        ),
        algorithm_id=algorithm_id,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=WITHIN_VALIDATED_RANGE, value=YES if validity.within else NO
            )
        ],
    )
    items = [_text(DOMAIN_OF_VALIDITY, validity.summary())]
    items += [_text(OUTSIDE_RANGE_REASON, reason) for reason in validity.reasons]
    items += [_text(VALIDITY_NOTE, note) for note in validity.notes]
    items += [_text(VALIDITY_MEASURE, f"{name}={value:.6g}") for name, value in validity.measures]
    _append(group, items)
    return group


def _mimic_group(
    mimic: DiffusionMimic,
    number: int,
    count: int,
    main_tracking_uid: str,
    sources: SliceSources,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 for a component set aside by the restricted-diffusion guard.

    Built like a per-lesion group (centre-of-mass point, the slices it spans,
    volume, mean ADC) so the radiologist can find what the network saw, but
    with finding type :data:`DWI_MIMIC` instead of Infarct: no reader that
    sums Infarct groups counts it.  rADC and the reason say why it is not a
    lesion.
    """
    measurements = [hd.sr.Measurement(name=VOLUME, value=mimic.volume_ml, unit=MILLILITER)]
    if mimic.mean_adc is not None:
        measurements.append(
            hd.sr.Measurement(
                name=APPARENT_DIFFUSION_COEFFICIENT,
                value=mimic.mean_adc,
                unit=UM2_PER_S,
                derivation=MEAN,
            )
        )
    if mimic.relative_adc is not None:
        measurements.append(
            hd.sr.Measurement(name=RELATIVE_ADC, value=mimic.relative_adc, unit=NO_UNITS)
        )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid("dwi-mimic", main_tracking_uid, str(number)),
            identifier=_MIMIC_TRACKING_ID.format(k=number, n=count),
        ),
        referenced_volume_surface=hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray([mimic.centroid_mm], dtype=np.float64),
            frame_of_reference_uid=str(sources.first.FrameOfReferenceUID),
            source_images=sources.sr_source_images(mimic.first_slice, mimic.last_slice + 1),
        ),
        geometric_purpose=CENTER_OF_MASS,
        finding_type=DWI_MIMIC,
        algorithm_id=algorithm_id,
        measurements=measurements,
    )
    _append(
        group,
        [
            _text(SLICE_RANGE, _slice_range_text(mimic.first_slice, mimic.last_slice, sources)),
            _text(NOT_COUNTED_REASON, mimic.reason),
        ],
    )
    return group


def _core_group(
    findings: LesionFindings,
    main_tracking_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
    core_volume_cutoffs_ml: Sequence[float],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for the ADC-defined core, with the optional cut-off comparisons."""
    comparisons = (
        findings.core_volume_comparisons(core_volume_cutoffs_ml) if core_volume_cutoffs_ml else ()
    )
    threshold = f"{findings.adc_core_threshold:g}"
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid("adc-core", main_tracking_uid),
            identifier=f"ADC core (ADC below {threshold} um2/s)",
        ),
        finding_category=LESION_CATEGORY,
        finding_type=INFARCT,
        method=adc_core_method_code(findings.adc_core_threshold),
        finding_sites=[hd.sr.FindingSite(anatomic_location=BRAIN)],
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(name=VOLUME, value=findings.adc_core_volume_ml, unit=MILLILITER)
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=core_volume_below_code(c.cutoff_ml), value=YES if c.below else NO
            )
            for c in comparisons
        ]
        or None,
    )
    clusters = (
        _CORE_CLUSTERS.format(min_ml=f"{findings.core_min_cluster_ml:g}")
        if findings.core_min_cluster_ml > 0
        else _CORE_NO_CLUSTERS
    )
    comments = [_text(COMMENT, _CORE_COMMENT.format(threshold=threshold, clusters=clusters))]
    if comparisons:
        comments.append(_text(COMMENT, CORE_VOLUME_DISCLAIMER.format(threshold=threshold)))
    _append(group, comments)
    return group


@dataclass(frozen=True, slots=True)
class _ReportSeries:
    """The SR's own series, instance and equipment attributes."""

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int
    series_description: str
    manufacturer: str
    manufacturer_model_name: str
    software_version: str
    device_serial_number: str


@dataclass(frozen=True, slots=True)
class _ReportScope:
    """What the report states beyond the whole-lesion volume, and how much of it."""

    findings: LesionFindings | None
    core_volume_cutoffs_ml: Sequence[float]
    max_itemised_lesions: int
    finding_site: Code | hd.sr.CodedConcept | None


def build_volume_report(
    seg: hd.seg.Segmentation | Dataset,
    source_images: Sequence[Dataset] | SliceSources,
    lesion_volume_ml: float,
    *,
    algorithm: AlgorithmInfo,
    findings: LesionFindings | None = None,
    core_volume_cutoffs_ml: Sequence[float] = (),
    max_itemised_lesions: int = 50,
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
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report of ``lesion_volume_ml`` for segment 1 of ``seg``.

    ``previous_versions`` are earlier reports of this study that this one
    supersedes (a re-run); they go into PredecessorDocumentsSequence.

    ``source_images`` are the images ``seg`` was derived from (headers are
    enough), in mask order, or :class:`~service.derive.references.SliceSources`
    for frames of multi-frame objects and MOSAIC tiles (the report then
    references the objects with the frames the mask lies on); the source
    objects and ``seg`` become the SR's evidence.
    ``lesion_volume_ml`` may be 0.0 (no lesion): the report is still written,
    with "Absent".  ``finding_site`` (e.g. a vascular territory) is optional.

    With ``findings`` (computed on the same mask, slice ``i`` on
    ``source_images[i]``) the report adds the count, per-lesion groups, ADC
    and quality items and the ADC-core group described in the module
    docstring; ``core_volume_cutoffs_ml`` (e.g.
    :data:`service.derive.findings.CORE_VOLUME_CUTOFFS_ML`) adds the labelled
    core-volume comparisons.  At most ``max_itemised_lesions`` lesions get a
    group of their own (largest first), so a speckled mask cannot produce a
    report no one can read; all of them are counted.

    Raises
    ------
    ValueError
        If the volume is negative or not finite, ``seg`` is not a SEG of
        the sources' study with a segment 1, or ``findings`` describe another
        volume or another number of slices.
    """
    volume = float(lesion_volume_ml)
    if not math.isfinite(volume) or volume < 0.0:
        raise ValueError(f"lesion_volume_ml must be a finite number >= 0, got {lesion_volume_ml!r}")
    sources = _checked_sources(seg, source_images)
    scope = _ReportScope(findings, core_volume_cutoffs_ml, max_itemised_lesions, finding_site)
    _check_request(scope, volume, sources, series_number, instance_number)
    series = _ReportSeries(
        series_instance_uid=series_instance_uid or hd.UID(),
        sop_instance_uid=sop_instance_uid or hd.UID(),
        series_number=series_number,
        instance_number=instance_number,
        series_description=series_description,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name or algorithm.name,
        software_version=software_version,
        device_serial_number=device_serial_number,
    )
    _check_own_series(series, seg, sources)
    groups = _imaging_measurements(seg, sources, volume, scope, algorithm)
    sr = _comprehensive_3d_sr(series, groups, seg, sources, findings, previous_versions)
    _log_built(sr, seg, volume, findings)
    return sr


def _log_built(
    sr: Dataset, seg: hd.seg.Segmentation | Dataset, volume: float, findings: LesionFindings | None
) -> None:
    log.info(
        "built lesion volume SR",
        extra={
            "series_instance_uid": str(sr.SeriesInstanceUID),
            "sop_instance_uid": str(sr.SOPInstanceUID),
            "seg_sop_instance_uid": str(seg.SOPInstanceUID),
            "lesion_volume_ml": volume,
            "lesion_count": findings.lesion_count if findings is not None else None,
        },
    )


def _checked_sources(
    seg: hd.seg.Segmentation | Dataset, source_images: Sequence[Dataset] | SliceSources
) -> SliceSources:
    """The sources as :class:`SliceSources`, checked to be the sources of ``seg``."""
    if len(source_images) == 0:
        raise ValueError("at least one source image is required")
    sources = as_slice_sources(source_images)
    _check_seg(seg, sources)
    return sources


def _check_request(
    scope: _ReportScope,
    volume: float,
    sources: SliceSources,
    series_number: int,
    instance_number: int,
) -> None:
    """Raise ``ValueError`` unless the numbers are valid and the findings are of this mask."""
    if series_number < 1 or instance_number < 1:
        raise ValueError("series_number and instance_number must be positive")
    if scope.max_itemised_lesions < 0:
        raise ValueError("max_itemised_lesions must be >= 0")
    if scope.findings is not None:
        _check_findings(scope.findings, volume, sources)
    elif scope.core_volume_cutoffs_ml:
        raise ValueError("core-volume comparisons need findings (the ADC core volume)")


def _check_own_series(
    series: _ReportSeries, seg: hd.seg.Segmentation | Dataset, sources: SliceSources
) -> None:
    """A report in the SEG's or a source's series would be filed as part of that series."""
    if series.series_instance_uid in {str(seg.SeriesInstanceUID)} | {
        str(ds.SeriesInstanceUID) for ds in sources.objects
    }:
        raise ValueError("the SR must be in its own series, not the SEG's or the source series")


def _device_observer(series: _ReportSeries) -> hd.sr.ObserverContext:
    """Observer context: this installation as a device, the algorithm as its model."""
    return hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DCM.Device),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(series.manufacturer, series.device_serial_number),
            name=series.manufacturer,
            manufacturer_name=series.manufacturer,
            model_name=series.manufacturer_model_name,
            serial_number=series.device_serial_number,
        ),
    )


def _findings_measurements(findings: LesionFindings | None) -> list[hd.sr.Measurement]:
    """The whole lesion's numbers beyond its volume: count, mean ADC, probability, borderline."""
    if findings is None:
        return []
    measurements = [
        hd.sr.Measurement(
            name=NUMBER_OF_LESIONS,
            value=findings.lesion_count,
            unit=NO_UNITS,
            method=CONNECTED_COMPONENTS_26,
        )
    ]
    if findings.mean_adc is not None:
        measurements.append(
            hd.sr.Measurement(
                name=APPARENT_DIFFUSION_COEFFICIENT,
                value=findings.mean_adc,
                unit=UM2_PER_S,
                derivation=MEAN,
            )
        )
    if findings.mean_probability is not None:
        measurements.append(
            hd.sr.Measurement(
                name=MEAN_LESION_PROBABILITY, value=findings.mean_probability, unit=NO_UNITS
            )
        )
    measurements.append(
        hd.sr.Measurement(
            name=borderline_fraction_code(*findings.borderline_range),
            value=findings.borderline_fraction,
            unit=NO_UNITS,
        )
    )
    return measurements


def _findings_texts(findings: LesionFindings | None, max_itemised: int) -> list[hd.sr.ContentItem]:
    """The whole lesion's TEXT items: input quality, and comments on sizes, the lesions not
    itemised and the components set aside, each only where there is something to say."""
    if findings is None:
        return []
    texts: list[hd.sr.ContentItem] = []
    if findings.input_quality:
        texts.append(_text(IMAGE_QUALITY, findings.input_quality))
    if findings.lesions:
        texts.append(_text(COMMENT, _SIZE_COMMENT))
    if findings.lesion_count > max_itemised:
        rest = findings.lesions[max_itemised:]
        texts.append(
            _text(
                COMMENT,
                f"{len(rest)} further lesions (each {rest[0].volume_ml:.3g} mL or less) are "
                "counted and included in the total volume but not itemised.",
            )
        )
    if findings.mimics:
        n = len(findings.mimics)
        comment = _MIMIC_COMMENT.format(
            n=n,
            s="" if n == 1 else "s",
            ml=f"{sum(m.volume_ml for m in findings.mimics):.3g}",
            verb="is" if n == 1 else "are",
        )
        texts.append(_text(COMMENT, comment))
    return texts


def _whole_lesion_group(
    seg: hd.seg.Segmentation | Dataset,
    sources: SliceSources,
    volume: float,
    scope: _ReportScope,
    tracking_uid: str,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 for segment 1 of ``seg``: the lesion volume, present/absent, and the findings."""
    site = scope.finding_site
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid,
            identifier=LESION_TRACKING_ID,
        ),
        referenced_segment=_referenced_segment(seg, sources),
        finding_type=INFARCT,
        finding_category=LESION_CATEGORY,
        algorithm_id=algorithm_id,
        finding_sites=[hd.sr.FindingSite(anatomic_location=site)] if site is not None else None,
        measurements=[
            hd.sr.Measurement(name=VOLUME, value=volume, unit=MILLILITER),
            *_findings_measurements(scope.findings),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=PRESENCE_OF_PROPERTY,
                value=PRESENT if volume > 0.0 else ABSENT,
            )
        ],
    )
    _append(group, _findings_texts(scope.findings, scope.max_itemised_lesions))
    return group


def _imaging_measurements(
    seg: hd.seg.Segmentation | Dataset,
    sources: SliceSources,
    volume: float,
    scope: _ReportScope,
    algorithm: AlgorithmInfo,
) -> list[_Group]:
    """The report's measurement groups, in reading order.

    The domain-of-validity statement first (it qualifies every number after
    it), then the whole lesion, each itemised lesion, each set-aside
    component and the ADC core.
    """
    algorithm_id = sr_algorithm_identification(algorithm)
    tracking_uid = _segment_tracking_uid(seg)  # the SEG segment's: groups derive theirs from it
    groups: list[_Group] = [
        _whole_lesion_group(seg, sources, volume, scope, tracking_uid, algorithm_id)
    ]
    findings = scope.findings
    if findings is None:
        return groups
    if findings.validity is not None:
        groups.insert(0, _validity_group(findings.validity, tracking_uid, algorithm_id))
    groups.extend(
        _lesion_group(lesion, findings.lesion_count, tracking_uid, sources, algorithm_id)
        for lesion in findings.lesions[: scope.max_itemised_lesions]
    )
    n_mimics = len(findings.mimics)
    groups.extend(
        _mimic_group(mimic, k, n_mimics, tracking_uid, sources, algorithm_id)
        for k, mimic in enumerate(findings.mimics, start=1)
    )
    groups.append(_core_group(findings, tracking_uid, algorithm_id, scope.core_volume_cutoffs_ml))
    return groups


def _comprehensive_3d_sr(
    series: _ReportSeries,
    groups: Sequence[_Group],
    seg: hd.seg.Segmentation | Dataset,
    sources: SliceSources,
    findings: LesionFindings | None,
    previous_versions: Sequence[Dataset],
) -> hd.sr.Comprehensive3DSR:
    """The SR document holding the TID 1500 report, with the sources and ``seg`` as evidence.

    ``evidence[0]`` supplies the SR's patient/study modules (and the
    acquisition equipment listed as contributing equipment), hence the
    patched first source.  COMPLETE and FINAL (this run will not revise it)
    but UNVERIFIED: no person attested it.
    """
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=_device_observer(series)
        ),
        procedure_reported=BRAIN_MRI,
        imaging_measurements=list(groups),
    )
    objects = sources.objects
    return hd.sr.Comprehensive3DSR(
        evidence=[with_patient_study_fallbacks(objects[0]), *objects[1:], seg],
        content=report,
        series_instance_uid=series.series_instance_uid,
        series_number=series.series_number,
        sop_instance_uid=series.sop_instance_uid,
        instance_number=series.instance_number,
        manufacturer=series.manufacturer,
        is_complete=True,
        is_final=True,
        is_verified=False,
        series_description=series.series_description,
        manufacturer_model_name=series.manufacturer_model_name,
        software_versions=series.software_version,
        device_serial_number=series.device_serial_number,
        coding_schemes=[private_coding_scheme()] if findings is not None else None,
        previous_versions=list(previous_versions) or None,
    )


# ---------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class ReportedLesion:
    """One per-lesion group as read back from an SR."""

    identifier: str
    tracking_uid: str
    volume_ml: float
    mean_adc: float | None
    size: str  # "small" | "medium" | "large"
    centroid_mm: tuple[float, float, float]
    source_sop_instance_uids: tuple[str, ...]
    instance_numbers: tuple[int, int] | None
    slice_indices: tuple[int, int]


@dataclass(frozen=True, slots=True)
class ReportedMimic:
    """One set-aside component (DWI-bright without restricted diffusion) read back from an SR."""

    identifier: str
    tracking_uid: str
    volume_ml: float
    mean_adc: float | None
    relative_adc: float | None
    centroid_mm: tuple[float, float, float]
    source_sop_instance_uids: tuple[str, ...]
    instance_numbers: tuple[int, int] | None
    slice_indices: tuple[int, int]
    reason: str


@dataclass(frozen=True, slots=True)
class ReportedFindings:
    """What :func:`read_lesion_findings` finds in an SR (None: not reported)."""

    lesion_volume_ml: float
    lesion_present: bool
    lesion_count: int | None
    lesion_count_method: str | None
    mean_adc: float | None
    mean_probability: float | None
    borderline_fraction: float | None
    input_quality: str | None
    lesions: tuple[ReportedLesion, ...]
    adc_core_volume_ml: float | None
    core_volume_below: dict[float, bool]
    comments: tuple[str, ...]
    algorithm_name: str | None
    algorithm_version: str | None
    algorithm_parameters: tuple[str, ...]
    private_schemes: tuple[str, ...]
    #: "within" | "outside" (None: the report makes no domain-of-validity statement).
    validity_status: str | None = None
    validity_summary: str | None = None
    validity_reasons: tuple[str, ...] = ()
    validity_notes: tuple[str, ...] = ()
    validity_measures: dict[str, float] = field(default_factory=dict)
    mimics: tuple[ReportedMimic, ...] = ()


def _parse_report(sr_dataset: Dataset) -> hd.sr.MeasurementReport:
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(sr_dataset, copy=True)
    except (AttributeError, ValueError) as exc:
        raise ValueError(f"not a readable SR document: {exc}") from exc
    content = sr.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError("SR is not a TID 1500 Measurement Report")
    return content


def _lesion_group_of(
    content: hd.sr.MeasurementReport,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """The one Infarct group that references a SEG segment (the whole lesion)."""
    groups = content.get_volumetric_roi_measurement_groups(
        finding_type=INFARCT, reference_type=codes.DCM.ReferencedSegment
    )
    if len(groups) != 1:
        raise ValueError(f"expected one infarct group referencing a segment, found {len(groups)}")
    return groups[0]


def _in_ml(measurement: hd.sr.Measurement) -> float:
    unit = measurement.unit
    if unit.scheme_designator != "UCUM" or unit.value not in _TO_ML:
        raise ValueError(
            f"unexpected unit for the infarct volume: {unit.value} ({unit.scheme_designator})"
        )
    return float(measurement.value) * _TO_ML[unit.value]


def _one_value(group: _Group, name: hd.sr.CodedConcept) -> float | None:
    found = group.get_measurements(name=name)
    if len(found) > 1:
        raise ValueError(f"more than one {name.meaning} in one group")
    return float(found[0].value) if found else None


def _mean_adc(group: _Group) -> float | None:
    found = group.get_measurements(name=APPARENT_DIFFUSION_COEFFICIENT)
    if not found:
        return None
    (measurement,) = found
    if measurement.unit.value != UM2_PER_S.value or measurement.derivation != MEAN:
        raise ValueError("mean ADC must be a Mean in um2/s")
    return float(measurement.value)


def _children(group: Template) -> list[Dataset]:
    return list(group[0].ContentSequence)


def _texts(group: Template, name: hd.sr.CodedConcept) -> list[str]:
    return [
        str(item.TextValue)
        for item in _children(group)
        if item.ValueType == "TEXT"
        and hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0]) == name
    ]


def _code_value(group: Template, name: hd.sr.CodedConcept) -> hd.sr.CodedConcept | None:
    for item in _children(group):
        if (
            item.ValueType == "CODE"
            and hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0]) == name
        ):
            return hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0])
    return None


def _point_and_sources(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
) -> tuple[tuple[float, float, float], tuple[str, ...]]:
    """The centre-of-mass point and the SOP Instance UIDs of the images it spans."""
    roi = group.roi
    if not isinstance(roi, hd.sr.VolumeSurface):
        raise ValueError("a component group's ROI must be a volume surface (centre of mass)")
    point = np.asarray(roi.graphic_data, dtype=float).reshape(-1)
    uids = tuple(
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in _children(group)
        if item.ValueType == "IMAGE"
        and hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0])
        == codes.DCM.SourceImageForSegmentation
    )
    return (float(point[0]), float(point[1]), float(point[2])), uids


def _slice_range(group: Template) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """(InstanceNumbers or None, slice indices) from a group's slice-range TEXT."""
    (slice_text,) = _texts(group, SLICE_RANGE)
    match = _SLICE_RANGE_RE.fullmatch(slice_text)
    if match is None:
        raise ValueError(f"unreadable slice range {slice_text!r}")
    kind, a, b, i, j, _ = match.groups()
    instance_numbers = None if kind != "InstanceNumber" or a == "unknown" else (int(a), int(b))
    return instance_numbers, (int(i), int(j))


def _read_mimic(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
) -> ReportedMimic:
    (volume,) = group.get_measurements(name=VOLUME)
    centroid, uids = _point_and_sources(group)
    instance_numbers, slice_indices = _slice_range(group)
    reasons = _texts(group, NOT_COUNTED_REASON)
    if len(reasons) != 1:
        raise ValueError("a set-aside component needs exactly one reason")
    return ReportedMimic(
        identifier=str(group.tracking_identifier),
        tracking_uid=str(group.tracking_uid),
        volume_ml=_in_ml(volume),
        mean_adc=_mean_adc(group),
        relative_adc=_one_value(group, RELATIVE_ADC),
        centroid_mm=centroid,
        source_sop_instance_uids=uids,
        instance_numbers=instance_numbers,
        slice_indices=slice_indices,
        reason=reasons[0],
    )


def _read_lesion(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
) -> ReportedLesion:
    (volume,) = group.get_measurements(name=VOLUME)
    size = _code_value(group, SIZE_DESCRIPTOR)
    sizes = {v.value: k for k, v in SIZE_VALUES.items()}
    if size is None or size.value not in sizes:
        raise ValueError("a lesion group lacks its Size Descriptor")
    centroid, uids = _point_and_sources(group)
    instance_numbers, slice_indices = _slice_range(group)
    return ReportedLesion(
        identifier=str(group.tracking_identifier),
        tracking_uid=str(group.tracking_uid),
        volume_ml=_in_ml(volume),
        mean_adc=_mean_adc(group),
        size=sizes[size.value],
        centroid_mm=centroid,
        source_sop_instance_uids=uids,
        instance_numbers=instance_numbers,
        slice_indices=slice_indices,
    )


@dataclass(frozen=True, slots=True)
class _ReportedValidity:
    status: str
    summary: str | None
    reasons: tuple[str, ...]
    notes: tuple[str, ...]
    measures: dict[str, float]


def _read_validity(content: hd.sr.MeasurementReport) -> _ReportedValidity | None:
    """The domain-of-validity group (the one with the Yes/No "within range" item), if any."""
    found: list[_ReportedValidity] = []
    for group in content.get_image_measurement_groups():
        answer = _code_value(group, WITHIN_VALIDATED_RANGE)
        if answer is None:
            continue
        if answer not in (YES, NO):
            raise ValueError("the domain-of-validity answer must be SCT Yes or No")
        summaries = _texts(group, DOMAIN_OF_VALIDITY)
        reasons = tuple(_texts(group, OUTSIDE_RANGE_REASON))
        if (answer == YES) == bool(reasons):
            raise ValueError("a result is outside the validated range exactly when reasons are given")
        measures: dict[str, float] = {}
        for text in _texts(group, VALIDITY_MEASURE):
            name, sep, value = text.partition("=")
            if not sep:
                raise ValueError(f"unreadable validity measure {text!r}")
            measures[name] = float(value)
        found.append(
            _ReportedValidity(
                status="within" if answer == YES else "outside",
                summary=summaries[0] if summaries else None,
                reasons=reasons,
                notes=tuple(_texts(group, VALIDITY_NOTE)),
                measures=measures,
            )
        )
    if len(found) > 1:
        raise ValueError("more than one domain-of-validity statement")
    return found[0] if found else None


def read_lesion_volume_ml(sr_dataset: Dataset) -> float:
    """The infarct volume in mL from a TID 1500 SR written by :func:`build_volume_report`.

    Parses with highdicom (what any TID 1500 consumer would see), picks the
    one volumetric Infarct group that references a SEG segment (per-lesion
    groups reference a centre-of-mass point instead) and its one Volume
    measurement, and converts UCUM volume units to mL.

    Raises
    ------
    ValueError
        If the dataset is not such a report, or holds zero or several infarct
        volumes, or an unknown unit.
    """
    content = _parse_report(sr_dataset)
    groups = content.get_volumetric_roi_measurement_groups(
        finding_type=INFARCT, reference_type=codes.DCM.ReferencedSegment
    )
    volumes = [m for g in groups for m in g.get_measurements(name=VOLUME)]
    if len(volumes) != 1:
        raise ValueError(f"expected exactly one infarct volume in the SR, found {len(volumes)}")
    return _in_ml(volumes[0])


def read_lesion_findings(sr_dataset: Dataset) -> ReportedFindings:
    """Everything :func:`build_volume_report` wrote, read back through highdicom.

    For tests and end-to-end checks; items a report does not hold (an SR
    built without findings) come back as None or empty.

    Raises
    ------
    ValueError
        If the dataset is not such a report or an item is malformed.
    """
    content = _parse_report(sr_dataset)
    main = _lesion_group_of(content)
    (volume,) = main.get_measurements(name=VOLUME)
    count, count_method = _lesion_count(main)
    borderline = [
        m
        for m in main.get_measurements()
        if m.name.scheme_designator == PRIVATE_SCHEME and m.name.value.startswith("BORDER")
    ]
    quality = _texts(main, IMAGE_QUALITY)
    core = _read_core(content)
    algorithm_name, algorithm_version, parameters = _read_algorithm(main)
    validity = _read_validity(content)
    return ReportedFindings(
        lesion_volume_ml=_in_ml(volume),
        lesion_present=_code_value(main, PRESENCE_OF_PROPERTY) == PRESENT,
        lesion_count=count,
        lesion_count_method=count_method,
        mean_adc=_mean_adc(main),
        mean_probability=_one_value(main, MEAN_LESION_PROBABILITY),
        borderline_fraction=float(borderline[0].value) if borderline else None,
        input_quality=quality[0] if quality else None,
        lesions=tuple(
            _read_lesion(g)
            for g in content.get_volumetric_roi_measurement_groups(
                finding_type=INFARCT, reference_type=codes.DCM.VolumeSurface
            )
        ),
        adc_core_volume_ml=core.volume_ml,
        core_volume_below=core.below,
        comments=(*_texts(main, COMMENT), *core.comments),
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        algorithm_parameters=parameters,
        private_schemes=tuple(
            str(item.CodingSchemeDesignator)
            for item in sr_dataset.get("CodingSchemeIdentificationSequence", [])
        ),
        validity_status=validity.status if validity else None,
        validity_summary=validity.summary if validity else None,
        validity_reasons=validity.reasons if validity else (),
        validity_notes=validity.notes if validity else (),
        validity_measures=validity.measures if validity else {},
        mimics=tuple(
            _read_mimic(g)
            for g in content.get_volumetric_roi_measurement_groups(
                finding_type=DWI_MIMIC, reference_type=codes.DCM.VolumeSurface
            )
        ),
    )


def _lesion_count(
    main: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
) -> tuple[int | None, str | None]:
    """The lesion count and its method's meaning (None, None: the report gives no count)."""
    found = main.get_measurements(name=NUMBER_OF_LESIONS)
    if len(found) > 1:
        raise ValueError("more than one lesion count")
    if not found:
        return None, None
    method = found[0].method
    return int(found[0].value), method.meaning if method is not None else None


@dataclass(frozen=True, slots=True)
class _ReportedCore:
    volume_ml: float | None
    below: dict[float, bool]
    comments: tuple[str, ...]


def _read_core(content: hd.sr.MeasurementReport) -> _ReportedCore:
    """The ADC-core group (method ADCLT<threshold>), if any: volume, cut-off answers, comments."""
    core_groups = [
        g
        for g in content.get_image_measurement_groups(finding_type=INFARCT)
        if g.method is not None and g.method.value.startswith("ADCLT")
    ]
    if len(core_groups) > 1:
        raise ValueError("more than one ADC core group")
    if not core_groups:
        return _ReportedCore(None, {}, ())
    core = core_groups[0]
    (core_measurement,) = core.get_measurements(name=VOLUME)
    volume_ml = _in_ml(core_measurement)
    below: dict[float, bool] = {}
    for item in _children(core):
        if item.ValueType != "CODE":
            continue
        name = hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0])
        if name.scheme_designator == PRIVATE_SCHEME and name.value.startswith("CORELT"):
            answer = hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0])
            below[float(name.value.removeprefix("CORELT"))] = answer == YES
    return _ReportedCore(volume_ml, below, tuple(_texts(core, COMMENT)))


def _read_algorithm(
    main: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
) -> tuple[str | None, str | None, tuple[str, ...]]:
    """TID 4019 of the lesion group: algorithm name, version and parameters."""
    name_text: str | None = None
    version: str | None = None
    parameters: list[str] = []
    for item in _children(main):
        name = hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0])
        if name == codes.DCM.AlgorithmName:
            name_text = str(item.TextValue)
        elif name == codes.DCM.AlgorithmVersion:
            version = str(item.TextValue)
        elif name == codes.DCM.AlgorithmParameters:
            parameters.append(str(item.TextValue))
    return name_text, version, tuple(parameters)
