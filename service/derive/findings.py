"""What the report says about the lesion, computed once from the model's output.

The SR (:mod:`service.derive.sr`) and the overlay (:mod:`service.derive.overlay`)
print numbers; this module computes them, with numpy/scipy only, so that the
numbers can be tested against hand-made masks without any DICOM in the way and
so that the SR and the overlay can never disagree.

Definitions (each is what the report and its tests mean by the word):

* **Lesion** -- a 3-D connected component of the binary mask with
  **26-connectivity** (voxels touching by a face, an edge or a corner belong
  to one lesion; ``scipy.ndimage.label`` with a 3x3x3 structure).  Lesions are
  numbered 1..n by decreasing voxel count; ties go to the component whose
  first voxel comes first in (slice, row, column) order, so the numbering is
  deterministic.
* **Volume** -- voxel count x voxel volume, where the voxel volume is
  row spacing x column spacing x the centre-to-centre *slice spacing* (not
  SliceThickness: with a gap between slices the spacing is what a voxel
  stands for).  This is the rule :class:`service.domain.ImageVolume` and the
  inference stage use, so the SR's total equals the job's lesion volume.
* **Volume class** -- small < 1.7 mL, medium 1.7-14 mL (both ends
  included), large > 14 mL.
* **Slice range** -- first and last slice index (0-based, into the mask,
  whose slices must be in spatial order) that the lesion touches.
* **Centroid** -- the mean patient position (DICOM LPS, mm) of the lesion's
  voxel centres.
* **ADC** -- in 1e-6 mm2/s (= um2/s), the unit of
  :attr:`service.domain.DiffusionStudy.adc`.  Only finite values > 0 count:
  0 and negative values are fit failures or masked background, not tissue,
  and would otherwise read as "severely restricted diffusion".
* **ADC core** -- voxels inside the brain mask with valid ADC below 620
  (the usual MRI ischemic-core threshold, as in DEFUSE-3/DAWN's RAPID
  processing), independent of the model's mask, counted only where they form
  a cluster of at least ``core_min_cluster_ml`` (default 0.3 mL; 0 = every
  voxel).  Clusters are 3-D components with **6-connectivity** (voxels
  sharing a face).  Why: a noisy ADC map has single voxels below 620 all
  over normal tissue, and with thick slices they add up to several mL
  (measured on our phantoms: 9 mL of "core" in a study without any lesion,
  all in clusters < 0.2 mL), enough to move a 21 mL cut-off comparison.
  6- rather than 26-connectivity because voxels that touch only at an edge
  or a corner chain noise into large false clusters (another phantom study,
  at 0.3 mL: 70 mL with 26-, 12 mL with 6-connectivity, 6 mL of it in the
  true lesion).  A core large enough to matter for a cut-off is a solid
  region many times larger than 0.3 mL, so the filter removes noise, not
  core.  The brain mask (:func:`service.preprocess.brain_mask`: Otsu head
  mask on the high-b DWI, largest component, holes filled, eroded) keeps
  background, skull and scalp out; ventricles are inside it but CSF's ADC
  (~3000) is far above the threshold; ADC values <= 0 or non-finite
  (zero-filled background, fit failures) never count.
* **Mean ADC / mean probability** -- over the lesion voxels (valid ADC only
  for the ADC); ``None`` without lesion voxels.
* **Borderline fraction** -- of the voxels with probability >= 0.3 (anything
  the model considered possibly lesion), the fraction with probability <=
  0.7; 0.0 when no voxel reaches 0.3.  A high value means the mask edge, or
  the whole lesion, sits where the model is unsure.
* **Core-volume comparisons** -- whether the ADC-core volume is below each of
  the DAWN / DEFUSE-3 core-volume cut-offs (21, 31, 51, 70 mL).  They are
  volume comparisons only: the trials' criteria also involve age, NIHSS,
  perfusion and timing, which we do not see, so they are not treatment advice.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from service.domain import DiffusionMimic, DomainOfValidity, ImageVolume, Vector3

__all__ = [
    "ADC_CORE_THRESHOLD",
    "BORDERLINE_PROBABILITY",
    "CONNECTIVITY",
    "CORE_CLUSTER_CONNECTIVITY",
    "CORE_MIN_CLUSTER_ML",
    "CORE_VOLUME_CUTOFFS_ML",
    "CoreVolumeComparison",
    "GridGeometry",
    "Lesion",
    "LesionFindings",
    "VolumeClass",
    "compute_lesion_findings",
]

log = logging.getLogger(__name__)

#: ADC below this (1e-6 mm2/s) counts as ischemic core.
ADC_CORE_THRESHOLD = 620.0
#: Probabilities in this closed range count as borderline.
BORDERLINE_PROBABILITY: tuple[float, float] = (0.3, 0.7)
#: Connectivity of the lesion components (3-D: 6, 18 or 26; we use 26).
CONNECTIVITY = 26
#: DAWN (21, 31, 51 mL) and DEFUSE-3 (70 mL) core-volume cut-offs.
CORE_VOLUME_CUTOFFS_ML: tuple[float, ...] = (21.0, 31.0, 51.0, 70.0)
#: ADC-core clusters smaller than this (mL) are noise, not core (see the module docstring).
CORE_MIN_CLUSTER_ML = 0.3
#: Connectivity of the ADC-core clusters (6: face neighbours only).
CORE_CLUSTER_CONNECTIVITY = 6

_SMALL_BELOW_ML = 1.7
_LARGE_ABOVE_ML = 14.0
#: Median brain ADC below this cannot be in 1e-6 mm2/s (brain tissue is ~700-900).
_ADC_UNIT_SANITY_MEDIAN = 50.0
_ADC_UNIT_SANITY_MIN_VOXELS = 100


class VolumeClass(enum.StrEnum):
    """Lesion size by volume: small < 1.7 mL <= medium <= 14 mL < large."""

    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"

    @classmethod
    def from_volume_ml(cls, volume_ml: float) -> VolumeClass:
        if volume_ml < _SMALL_BELOW_ML:
            return cls.SMALL
        if volume_ml > _LARGE_ABOVE_ML:
            return cls.LARGE
        return cls.MEDIUM


def _unit(v: Sequence[float], what: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(v, dtype=np.float64)
    if arr.shape != (3,) or not np.isfinite(arr).all():
        raise ValueError(f"{what} must be three finite numbers")
    norm = float(np.linalg.norm(arr))
    if not math.isclose(norm, 1.0, abs_tol=1e-3):
        raise ValueError(f"{what} must be a unit vector, has length {norm:.4f}")
    return arr / norm


@dataclass(frozen=True, slots=True, eq=False)
class GridGeometry:
    """Where each voxel of a (slices, rows, columns) array lies in patient space.

    ``slice_origins[i]`` is the ImagePositionPatient (centre of the first
    voxel, LPS mm) of slice ``i``; slices must be in spatial order (strictly
    monotonic along the slice normal), since a "slice range" means nothing
    otherwise.  ``row_cosine``/``column_cosine`` are ImageOrientationPatient
    [0:3]/[3:6]; ``pixel_spacing`` is (between rows, between columns) as in
    DICOM; ``slice_spacing`` is the centre-to-centre slice distance.
    """

    slice_origins: npt.NDArray[np.float64]
    row_cosine: Vector3
    column_cosine: Vector3
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    def __post_init__(self) -> None:
        origins = np.array(self.slice_origins, dtype=np.float64)  # a private copy
        if origins.ndim != 2 or origins.shape[1] != 3 or len(origins) == 0:
            raise ValueError(f"slice_origins must have shape (n, 3), got {origins.shape}")
        if not np.isfinite(origins).all():
            raise ValueError("slice_origins must be finite")
        row = _unit(self.row_cosine, "row_cosine")
        column = _unit(self.column_cosine, "column_cosine")
        if abs(float(row @ column)) > 1e-3:
            raise ValueError("row_cosine and column_cosine must be orthogonal")
        spacing = tuple(float(s) for s in self.pixel_spacing)
        if len(spacing) != 2 or min(spacing) <= 0 or not all(math.isfinite(s) for s in spacing):
            raise ValueError(
                f"pixel_spacing must be two positive numbers, got {self.pixel_spacing}"
            )
        if not (math.isfinite(self.slice_spacing) and self.slice_spacing > 0):
            raise ValueError(f"slice_spacing must be positive, got {self.slice_spacing}")
        if len(origins) > 1:
            steps = np.diff(origins @ np.cross(row, column))
            if not ((steps > 0).all() or (steps < 0).all()):
                raise ValueError(
                    "slices must be in spatial order (monotonic along the slice normal)"
                )
        origins.setflags(write=False)
        object.__setattr__(self, "slice_origins", origins)
        object.__setattr__(self, "row_cosine", tuple(float(v) for v in row))
        object.__setattr__(self, "column_cosine", tuple(float(v) for v in column))
        object.__setattr__(self, "pixel_spacing", spacing)
        object.__setattr__(self, "slice_spacing", float(self.slice_spacing))

    @classmethod
    def from_volume(cls, volume: ImageVolume) -> GridGeometry:
        """The grid of a domain :class:`ImageVolume` (e.g. ``study.dwi``)."""
        n = volume.shape[0]
        origins = np.asarray(volume.origin, dtype=np.float64) + np.outer(
            np.arange(n) * volume.slice_spacing, np.asarray(volume.slice_cosine, dtype=np.float64)
        )
        return cls(
            slice_origins=origins,
            row_cosine=volume.row_cosine,
            column_cosine=volume.column_cosine,
            pixel_spacing=volume.pixel_spacing,
            slice_spacing=volume.slice_spacing,
        )

    @property
    def n_slices(self) -> int:
        return int(self.slice_origins.shape[0])

    @property
    def voxel_volume_ml(self) -> float:
        """Volume one voxel stands for, in mL (1 mL = 1000 mm3)."""
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing / 1000.0

    def to_patient(self, indices: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Patient positions (N, 3) of voxel centres given as (slice, row, column) rows."""
        idx = np.asarray(indices)
        if idx.ndim != 2 or idx.shape[1] != 3:
            raise ValueError("indices must have shape (N, 3): (slice, row, column)")
        slices = idx[:, 0].astype(np.intp)
        rows = idx[:, 1].astype(np.float64)
        columns = idx[:, 2].astype(np.float64)
        row_step = np.asarray(self.column_cosine) * self.pixel_spacing[0]  # one row down
        column_step = np.asarray(self.row_cosine) * self.pixel_spacing[1]  # one column right
        positions: npt.NDArray[np.float64] = (
            self.slice_origins[slices] + np.outer(rows, row_step) + np.outer(columns, column_step)
        )
        return positions


@dataclass(frozen=True, slots=True)
class Lesion:
    """One connected component of the mask (see the module docstring)."""

    number: int
    voxel_count: int
    volume_ml: float
    first_slice: int
    last_slice: int
    centroid_mm: Vector3
    mean_adc: float | None
    mean_probability: float

    def __post_init__(self) -> None:
        if self.number < 1 or self.voxel_count < 1:
            raise ValueError("a lesion has a number >= 1 and at least one voxel")
        if not (0 <= self.first_slice <= self.last_slice):
            raise ValueError("first_slice must be >= 0 and <= last_slice")
        if not (math.isfinite(self.volume_ml) and self.volume_ml > 0):
            raise ValueError("a lesion's volume must be positive")

    @property
    def volume_class(self) -> VolumeClass:
        return VolumeClass.from_volume_ml(self.volume_ml)


@dataclass(frozen=True, slots=True)
class CoreVolumeComparison:
    """Whether the ADC-core volume is below ``cutoff_ml`` (a comparison, not advice)."""

    cutoff_ml: float
    core_volume_ml: float

    @property
    def below(self) -> bool:
        return self.core_volume_ml < self.cutoff_ml


@dataclass(frozen=True, slots=True)
class LesionFindings:
    """Everything the report states about one segmentation; see the module docstring.

    Build it with :func:`compute_lesion_findings`.  ``shape`` is the mask's
    (slices, rows, columns), kept so that a consumer can check it was given
    findings for the images it is writing about.
    """

    shape: tuple[int, int, int]
    voxel_volume_ml: float
    voxel_count: int
    lesions: tuple[Lesion, ...]
    mean_adc: float | None
    adc_core_volume_ml: float
    mean_probability: float | None
    borderline_fraction: float
    input_quality: str = ""
    adc_core_threshold: float = ADC_CORE_THRESHOLD
    borderline_range: tuple[float, float] = BORDERLINE_PROBABILITY
    #: Smallest ADC-core cluster counted in ``adc_core_volume_ml`` (0: every voxel).
    core_min_cluster_ml: float = 0.0
    #: Components the restricted-diffusion guard set aside (not in the lesion volume).
    mimics: tuple[DiffusionMimic, ...] = ()
    #: Whether the result lies inside the model's validated range (None: not assessed).
    validity: DomainOfValidity | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be (slices, rows, columns), got {self.shape}")
        if not (math.isfinite(self.voxel_volume_ml) and self.voxel_volume_ml > 0):
            raise ValueError("voxel_volume_ml must be positive")
        if sum(lesion.voxel_count for lesion in self.lesions) != self.voxel_count:
            raise ValueError("the lesions' voxel counts must add up to voxel_count")
        if [lesion.number for lesion in self.lesions] != list(range(1, len(self.lesions) + 1)):
            raise ValueError("lesions must be numbered 1..n in order")
        if not (math.isfinite(self.adc_core_volume_ml) and self.adc_core_volume_ml >= 0):
            raise ValueError("adc_core_volume_ml must be >= 0")
        if not (math.isfinite(self.core_min_cluster_ml) and self.core_min_cluster_ml >= 0):
            raise ValueError("core_min_cluster_ml must be >= 0")
        if not 0.0 <= self.borderline_fraction <= 1.0:
            raise ValueError("borderline_fraction must lie in [0, 1]")
        if self.mean_probability is not None and not 0.0 <= self.mean_probability <= 1.0:
            raise ValueError("mean_probability must lie in [0, 1]")
        if (self.mean_probability is None) != (self.voxel_count == 0):
            raise ValueError("mean_probability is given exactly when there are lesion voxels")
        if self.mean_adc is not None and not (math.isfinite(self.mean_adc) and self.mean_adc > 0):
            raise ValueError("mean_adc must be positive")
        if "\x00" in self.input_quality:
            raise ValueError("input_quality must be plain text")

    @property
    def lesion_count(self) -> int:
        return len(self.lesions)

    @property
    def connectivity(self) -> int:
        """Lesions are 3-D components with this connectivity (always 26)."""
        return CONNECTIVITY

    @property
    def total_volume_ml(self) -> float:
        return self.voxel_count * self.voxel_volume_ml

    def core_volume_comparisons(
        self, cutoffs_ml: Sequence[float] = CORE_VOLUME_CUTOFFS_ML
    ) -> tuple[CoreVolumeComparison, ...]:
        """The ADC-core volume against each cut-off, in increasing cut-off order."""
        cutoffs = sorted({float(c) for c in cutoffs_ml})
        if any(not (math.isfinite(c) and c > 0) for c in cutoffs):
            raise ValueError("core-volume cut-offs must be positive numbers of mL")
        return tuple(CoreVolumeComparison(c, self.adc_core_volume_ml) for c in cutoffs)


def _as_mask(arr: npt.ArrayLike, what: str, shape: tuple[int, ...] | None) -> npt.NDArray[np.bool_]:
    a = np.asarray(arr)
    if a.dtype != np.bool_:
        if not np.issubdtype(a.dtype, np.integer) or (a.size and not np.isin(a, (0, 1)).all()):
            raise ValueError(f"{what} must be boolean (or 0/1 integers), got dtype {a.dtype}")
        a = a.astype(np.bool_)
    if a.ndim != 3:
        raise ValueError(f"{what} must be 3-D (slices, rows, columns), got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{what} has shape {a.shape}, the mask {shape}")
    return a


def _as_values(arr: npt.ArrayLike, what: str, shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    a = np.asarray(arr, dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"{what} has shape {a.shape}, the mask {shape}")
    return a


def _core_voxel_count(candidates: npt.NDArray[np.bool_], *, min_cluster_voxels: int) -> int:
    """Voxels of ``candidates`` in 6-connected clusters of at least ``min_cluster_voxels``."""
    if min_cluster_voxels <= 1:
        return int(np.count_nonzero(candidates))
    structure = ndimage.generate_binary_structure(3, 1)  # 6-connectivity
    labels, n = ndimage.label(candidates, structure=structure)
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return int(sizes[sizes >= min_cluster_voxels].sum())


def compute_lesion_findings(
    mask: npt.ArrayLike,
    probability: npt.ArrayLike,
    adc: npt.ArrayLike,
    brain_mask: npt.ArrayLike,
    geometry: GridGeometry,
    *,
    input_quality: str = "",
    adc_core_threshold: float = ADC_CORE_THRESHOLD,
    borderline_range: tuple[float, float] = BORDERLINE_PROBABILITY,
    core_min_cluster_ml: float = CORE_MIN_CLUSTER_ML,
    mimics: Sequence[DiffusionMimic] = (),
    validity: DomainOfValidity | None = None,
    core_region: npt.ArrayLike | None = None,
) -> LesionFindings:
    """Measure ``mask`` (the model's lesion mask) as the module docstring defines.

    All arrays are (slices, rows, columns) on one grid, described by
    ``geometry``: ``probability`` in [0, 1], ``adc`` in 1e-6 mm2/s (non-finite
    or <= 0 values are ignored), ``brain_mask`` boolean.  ``input_quality``
    is a short free-text flag for the report (e.g. intake notes); it must
    not contain patient identifiers.  ``core_min_cluster_ml`` is the
    smallest 6-connected cluster of low-ADC voxels counted as core (0: count
    every voxel).  ``core_region`` (boolean, same grid), when given,
    restricts the core to those voxels: the service passes the lesion mask
    (``derive.core_scope: lesion``), because on real healthy scans a
    whole-brain ADC < 620 count is not zero (measured 0-20 mL on the six
    scans in realdata/healthy: white-matter tracts, cerebellum and skull-base
    voxels at b=1000-1500), and a core outside any DWI lesion is not an
    acute infarct core.

    Raises
    ------
    ValueError
        On shape mismatches, a probability outside [0, 1], a geometry with
        another slice count, or an ADC map whose brain median is far too
        small to be in 1e-6 mm2/s (a unit mistake that would make the whole
        brain "core").
    """
    lesion_mask = _as_mask(mask, "mask", None)
    shape = lesion_mask.shape
    brain = _as_mask(brain_mask, "brain_mask", shape)
    prob = _as_values(probability, "probability", shape)
    adc_values = _as_values(adc, "adc", shape)
    low, high = _check_parameters(
        geometry, shape, prob, borderline_range, adc_core_threshold, core_min_cluster_ml
    )
    adc_valid = _valid_adc(adc_values, brain)
    voxel_ml = geometry.voxel_volume_ml
    core_volume_ml = _adc_core_volume_ml(
        brain & adc_valid & (adc_values < adc_core_threshold),
        core_region,
        min_cluster_ml=core_min_cluster_ml,
        voxel_ml=voxel_ml,
    )
    voxel_count = int(np.count_nonzero(lesion_mask))
    lesion_adc = adc_values[lesion_mask & adc_valid]
    findings = LesionFindings(
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        voxel_volume_ml=voxel_ml,
        voxel_count=voxel_count,
        lesions=_lesions(lesion_mask, prob, adc_values, adc_valid, geometry),
        mean_adc=float(lesion_adc.mean()) if lesion_adc.size else None,
        adc_core_volume_ml=core_volume_ml,
        mean_probability=(
            float(np.clip(prob[lesion_mask].mean(), 0.0, 1.0)) if voxel_count else None
        ),
        borderline_fraction=_borderline_fraction(prob, low, high),
        input_quality=input_quality,
        adc_core_threshold=float(adc_core_threshold),
        borderline_range=(low, high),
        core_min_cluster_ml=float(core_min_cluster_ml),
        mimics=tuple(mimics),
        validity=validity,
    )
    _log_computed(findings)
    return findings


def _log_computed(findings: LesionFindings) -> None:
    log.debug(
        "lesion findings computed",
        extra={
            "lesion_count": findings.lesion_count,
            "lesion_volume_ml": findings.total_volume_ml,
            "adc_core_volume_ml": findings.adc_core_volume_ml,
        },
    )


def _check_parameters(
    geometry: GridGeometry,
    shape: tuple[int, ...],
    prob: npt.NDArray[np.float64],
    borderline_range: tuple[float, float],
    adc_core_threshold: float,
    core_min_cluster_ml: float,
) -> tuple[float, float]:
    """Raise ``ValueError`` on a geometry of another slice count, a probability outside
    [0, 1] or a nonsensical parameter; returns the borderline range as floats."""
    if geometry.n_slices != shape[0]:
        raise ValueError(f"geometry has {geometry.n_slices} slices, the mask {shape[0]}")
    if not (
        np.isfinite(prob).all()
        and prob.min(initial=0.0) >= -1e-6
        and prob.max(initial=0.0) <= 1 + 1e-6
    ):
        raise ValueError("probability must be finite and within [0, 1]")
    low, high = (float(borderline_range[0]), float(borderline_range[1]))
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(
            f"borderline_range must satisfy 0 <= low <= high <= 1, got {borderline_range}"
        )
    if not (math.isfinite(adc_core_threshold) and adc_core_threshold > 0):
        raise ValueError("adc_core_threshold must be positive (1e-6 mm2/s)")
    if not (math.isfinite(core_min_cluster_ml) and core_min_cluster_ml >= 0):
        raise ValueError("core_min_cluster_ml must be >= 0 (mL)")
    return low, high


def _valid_adc(
    adc_values: npt.NDArray[np.float64], brain: npt.NDArray[np.bool_]
) -> npt.NDArray[np.bool_]:
    """Where the ADC is a measurement (finite, > 0), after checking that it is in 1e-6 mm2/s.

    An ADC map in mm2/s (brain median ~0.0008) would make the whole brain
    "core"; with enough valid brain voxels a median far below brain tissue's
    ~700-900 can only be that unit mistake.
    """
    with np.errstate(invalid="ignore"):
        adc_valid: npt.NDArray[np.bool_] = np.isfinite(adc_values) & (adc_values > 0)
    brain_adc = adc_values[brain & adc_valid]
    if (
        brain_adc.size >= _ADC_UNIT_SANITY_MIN_VOXELS
        and float(np.median(brain_adc)) < _ADC_UNIT_SANITY_MEDIAN
    ):
        raise ValueError(
            f"median ADC in the brain is {float(np.median(brain_adc)):.3g}; "
            "the ADC must be in 1e-6 mm2/s (brain tissue is ~700-900)"
        )
    return adc_valid


def _adc_core_volume_ml(
    candidates: npt.NDArray[np.bool_],
    core_region: npt.ArrayLike | None,
    *,
    min_cluster_ml: float,
    voxel_ml: float,
) -> float:
    """Volume of the ADC core: ``candidates`` (brain voxels with valid ADC below the
    threshold), restricted to ``core_region`` when given, in 6-connected clusters of at
    least ``min_cluster_ml``."""
    if core_region is not None:
        candidates = candidates & _as_mask(core_region, "core_region", candidates.shape)
    voxels = _core_voxel_count(
        candidates, min_cluster_voxels=math.ceil(min_cluster_ml / voxel_ml - 1e-9)
    )
    return voxels * voxel_ml


def _lesions(
    lesion_mask: npt.NDArray[np.bool_],
    prob: npt.NDArray[np.float64],
    adc_values: npt.NDArray[np.float64],
    adc_valid: npt.NDArray[np.bool_],
    geometry: GridGeometry,
) -> tuple[Lesion, ...]:
    """The 26-connected components of the mask as :class:`Lesion`, largest first."""
    structure = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
    labels, n_components = ndimage.label(lesion_mask, structure=structure)
    if not n_components:
        return ()
    counts = np.bincount(labels.ravel(), minlength=n_components + 1)[1:]
    # ndimage numbers components in raster order of their first voxel, so a
    # stable sort on -count breaks ties by that order.
    order = np.argsort(-counts, kind="stable")
    boxes = ndimage.find_objects(labels)
    flat = labels.ravel()  # per-component sums by bincount (ndimage.sum per index is slower)
    prob_means = np.bincount(flat, weights=np.asarray(prob, dtype=np.float64).ravel(),
                             minlength=n_components + 1)[1:] / counts
    adc_sums = np.bincount(flat, weights=np.where(adc_valid, adc_values, 0.0).ravel(),
                           minlength=n_components + 1)[1:]
    adc_counts = np.bincount(flat, weights=np.asarray(adc_valid, dtype=np.float64).ravel(),
                             minlength=n_components + 1)[1:]
    voxel_ml = geometry.voxel_volume_ml
    lesions: list[Lesion] = []
    for rank, i in enumerate(order, start=1):
        label = int(i) + 1
        box = boxes[int(i)]
        assert box is not None
        local = np.argwhere(labels[box] == label)
        offset = np.array([s.start for s in box])
        centroid = geometry.to_patient(local + offset).mean(axis=0)
        n_adc = float(adc_counts[i])
        lesions.append(
            Lesion(
                number=rank,
                voxel_count=int(counts[i]),
                volume_ml=int(counts[i]) * voxel_ml,
                first_slice=int(box[0].start),
                last_slice=int(box[0].stop) - 1,
                centroid_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                mean_adc=float(adc_sums[i]) / n_adc if n_adc else None,
                mean_probability=float(np.clip(prob_means[i], 0.0, 1.0)),
            )
        )
    return tuple(lesions)


def _borderline_fraction(prob: npt.NDArray[np.float64], low: float, high: float) -> float:
    """Of the voxels with probability >= ``low``, the fraction with probability <= ``high``."""
    candidates = prob >= low
    n_candidates = int(np.count_nonzero(candidates))
    borderline = int(np.count_nonzero(candidates & (prob <= high)))
    return borderline / n_candidates if n_candidates else 0.0
