"""Frozen values passed between pipeline stages, and the job state machine.

Every stage takes and returns these types; none of them imports another stage.
Geometry is kept in DICOM patient coordinates (LPS, millimetres) so that the
segmentation we write lands exactly on the source images and volumes in mL
are exact.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

Vector3 = tuple[float, float, float]

#: Diffusion images with b >= this (s/mm2) are the "high-b" DWI a lesion is segmented on;
#: below it an image is a b0/low-b reference (ADC from the pair, T2 shine-through checks).
HIGH_B_MIN = 500.0


class ImageRole(enum.StrEnum):
    """What an image contributes to lesion segmentation."""

    DWI = "dwi"  # diffusion-weighted, trace/isotropic, b > 0
    B0 = "b0"  # diffusion sequence, b = 0
    DIRECTIONAL = "directional"  # a single gradient direction, not a trace
    ADC = "adc"
    OTHER = "other"

    @classmethod
    def parse(cls, value: object) -> ImageRole:
        """A stored or given role; an unknown or empty one is ``OTHER``."""
        if isinstance(value, ImageRole):
            return value
        text = str(value or "")
        return cls(text) if text in cls._value2member_map_ else cls.OTHER


@dataclass(frozen=True, slots=True)
class InstanceSignature:
    """What one received instance contributes to its study, read from its header when it
    arrives (by intake) and kept with it (by the database), so the assembler can judge a
    study's completeness without opening a file.

    ``role`` is :class:`ImageRole` (a stored string is accepted and converted; an unknown or
    empty one is ``OTHER``).
    """

    series_instance_uid: str
    role: ImageRole = ImageRole.OTHER
    b_value: float | None = None
    slice_position: float | None = None  # mm along the slice normal (classic images)
    frames: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.role, ImageRole):
            object.__setattr__(self, "role", ImageRole.parse(self.role))


class JobState(enum.StrEnum):
    """Life cycle of one processing job for one study.

    received -> queued -> running -> delivered | failed | refused | held.
    ``failed`` may be retried (delivery or infrastructure problem);
    ``refused`` is final for that input (the study cannot be processed);
    ``held`` is a result outside the model's validated range kept back by the
    site policy (``assess.outside_range_policy: hold``): final until an
    operator releases it (``strokeseg release``: held -> queued -> delivered).
    """

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERED = "delivered"
    FAILED = "failed"
    REFUSED = "refused"
    HELD = "held"

    @property
    def is_final(self) -> bool:
        return self in (JobState.DELIVERED, JobState.FAILED, JobState.REFUSED, JobState.HELD)


@dataclass(frozen=True, slots=True, eq=False)
class ImageVolume:
    """A 3-D scalar image on a regular grid in patient coordinates.

    ``voxels`` has shape (slices, rows, columns).  ``origin`` is the
    ImagePositionPatient (centre of the first voxel) of slice 0;
    ``row_cosine``/``column_cosine`` are ImageOrientationPatient[0:3]/[3:6]
    (direction of increasing column / row index); ``slice_cosine`` is the unit
    vector along which the slice index increases.  ``pixel_spacing`` is in
    DICOM order (between rows, between columns).
    """

    voxels: npt.NDArray[np.float32]
    origin: Vector3
    row_cosine: Vector3
    column_cosine: Vector3
    slice_cosine: Vector3
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    def __post_init__(self) -> None:
        if self.voxels.ndim != 3:
            raise ValueError(f"voxels must be 3-D (slices, rows, columns), got {self.voxels.shape}")
        if min(self.pixel_spacing) <= 0 or self.slice_spacing <= 0:
            raise ValueError("spacings must be positive")

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.voxels.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 mL = 1000 mm3)."""
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing / 1000.0

    def with_voxels(self, voxels: npt.NDArray[np.float32]) -> ImageVolume:
        """The same grid carrying other values (e.g. a probability map)."""
        if voxels.shape != self.voxels.shape:
            raise ValueError(f"shape {voxels.shape} does not match grid {self.voxels.shape}")
        return ImageVolume(
            voxels=voxels,
            origin=self.origin,
            row_cosine=self.row_cosine,
            column_cosine=self.column_cosine,
            slice_cosine=self.slice_cosine,
            pixel_spacing=self.pixel_spacing,
            slice_spacing=self.slice_spacing,
        )

    def affine(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping (column, row, slice, 1) indices to patient mm."""
        m = np.eye(4)
        m[:3, 0] = np.asarray(self.row_cosine) * self.pixel_spacing[1]
        m[:3, 1] = np.asarray(self.column_cosine) * self.pixel_spacing[0]
        m[:3, 2] = np.asarray(self.slice_cosine) * self.slice_spacing
        m[:3, 3] = self.origin
        return m


@dataclass(frozen=True, slots=True)
class SourceFrame:
    """One source image (or one frame of a multi-frame object) behind a slice.

    ``frame_number`` (1-based) is set for multi-frame objects (Enhanced MR):
    a SEG must reference that frame (ReferencedFrameNumber), not the object.
    ``mosaic_index`` (0-based tile, row-major) is set for a slice cut out of a
    Siemens MOSAIC image: the DICOM object holds the whole slab in one frame,
    so no DICOM reference can point at the slice itself (see
    :mod:`service.intake.planes`).
    """

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None  # 1-based, for multi-frame objects
    mosaic_index: int | None = None  # 0-based tile of a Siemens MOSAIC


@dataclass(frozen=True, slots=True, eq=False)
class DiffusionStudy:
    """What inference needs of one study: the high-b trace DWI and the ADC map.

    ``adc`` lies on exactly the DWI grid, in units of 1e-6 mm2/s.
    ``dwi_sources[i]`` is the source image of ``dwi.voxels[i]``.
    """

    study_instance_uid: str
    dwi: ImageVolume
    b_value: float
    adc: ImageVolume
    dwi_sources: tuple[SourceFrame, ...]
    frame_of_reference_uid: str
    manufacturer: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    dwi_series_instance_uid: str = ""
    adc_origin: str = ""  # "scanner" (the scanner's map) | "computed" (from b0 and the trace)

    def __post_init__(self) -> None:
        if self.adc.shape != self.dwi.shape:
            raise ValueError("ADC must be resampled onto the DWI grid")
        if len(self.dwi_sources) != self.dwi.shape[0]:
            raise ValueError("one source frame per DWI slice is required")


@dataclass(frozen=True, slots=True, eq=False)
class LesionSegmentation:
    """The model's answer on the native DWI grid."""

    mask: npt.NDArray[np.bool_]
    probability: npt.NDArray[np.float32]
    lesion_volume_ml: float
    model_name: str
    model_version: str


@dataclass(frozen=True, slots=True)
class ResultObject:
    """A DICOM object we produced, on disk, ready for delivery."""

    kind: str  # "SEG" | "SR" | "OVERLAY"
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str

    @classmethod
    def of(cls, kind: str, path: Path, ds: Dataset) -> ResultObject:
        """The result object for dataset ``ds`` written at ``path``."""
        return cls(
            kind=kind,
            path=path,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
        )


@dataclass(frozen=True, slots=True)
class DiffusionMimic:
    """A component the network called lesion that is *not* restricted diffusion.

    An acute infarct is bright on DWI **and** dark on ADC.  A DWI-bright
    component whose ADC is normal or high is T2 shine-through, a chronic or
    subacute lesion, or an artefact (susceptibility pile-up, ghost, cortical
    ribbon); one outside the brain mask is never a lesion.  Such components
    are excluded from the lesion volume and listed in the SR instead, so the
    radiologist sees what the network saw and why it was not counted.
    ``mean_adc`` in 1e-6 mm2/s, ``relative_adc`` = mean ADC / the median ADC
    of normal-appearing brain; ``reason`` is operator-readable text.
    """

    volume_ml: float
    mean_adc: float | None
    relative_adc: float | None
    centroid_mm: Vector3
    first_slice: int
    last_slice: int
    reason: str

    def __post_init__(self) -> None:
        if not self.volume_ml > 0:
            raise ValueError("a mimic has a positive volume")
        if not 0 <= self.first_slice <= self.last_slice:
            raise ValueError("first_slice must be >= 0 and <= last_slice")
        if not self.reason:
            raise ValueError("a mimic needs the reason it was not counted")


@dataclass(frozen=True, slots=True)
class DomainOfValidity:
    """Whether a result lies inside the range the model was validated on, and why not.

    ``reasons`` is empty for a result within the validated range; otherwise
    each entry is one operator-readable reason (b-value, slice spacing,
    coverage, SNR, ADC plausibility, implausible lesion pattern).  An
    out-of-range result is still a result, but the SR says so first, the
    overlay label says so, the DB records it, and a site policy may hold it
    back (``assess.outside_range_policy``).  ``notes`` are facts worth
    reporting that do not put the result outside the range (e.g. "b=1500
    harmonised to a b=1000-equivalent trace").  ``adc_core_threshold`` is
    the ADC core threshold actually used (1e-6 mm2/s), calibrated for the
    acquired b-value.
    """

    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    b_value: float = 1000.0
    adc_core_threshold: float = 620.0
    measures: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if any(not r for r in self.reasons):
            raise ValueError("validity reasons must be non-empty text")

    @property
    def within(self) -> bool:
        return not self.reasons

    @property
    def status(self) -> str:
        """``within`` or ``outside`` (what the DB and ``strokeseg jobs`` show)."""
        return "within" if self.within else "outside"

    def summary(self) -> str:
        """One line for the SR, the overlay label and the job record."""
        if self.within:
            return "within the model's validated range"
        return "OUTSIDE VALIDATED RANGE: " + "; ".join(self.reasons)
