"""Simulated acute lesions inserted into *real* diffusion studies, written back as DICOM.

Phantoms teach a network what a lesion looks like on phantom anatomy; real
scans show cortical ribbons, susceptibility pile-up, ghosts and vendor
noise that phantoms do not.  Inserting lesions into real healthy studies
keeps all of that and adds a known truth.

Physics (per image plane, in the scanner's own pixel values):

* Inside the lesion the ADC falls to ``adc_lesion`` (0.25-0.6 x 1e-3 mm2/s)
  and T2 rises mildly (S0 x (1 + ``t2_increase``), 5-30 %).  With partial
  volume ``w`` (the lesion fraction of the voxel, integrated over the pixel
  and the slice thickness) the voxel's ADC becomes ``(1 - w) ADC + w
  adc_lesion`` and its S0 ``S0 (1 + w t2_increase)``.
* A b-weighted image (trace or any gradient direction) at b becomes
  ``S (1 + w t2) exp(-b w (adc_lesion - ADC))``; a b0 image ``S (1 + w t2)``;
  a scanner ADC map ``ADC + w (adc_lesion - ADC)``.  The geometric mean of the
  directions (the trace) and the ADC computed from it then follow exactly the
  mono-exponential model, whatever the number of directions.
* **The scan's own noise is kept**: the change is computed from a lightly
  smoothed copy of each plane (``S_smooth``) and *added* (``S + S_smooth (f -
  1)``), rather than multiplying the noisy pixel, as the issue asks.

Anatomy: the MNI152 maps (nilearn's wheel, :mod:`models.synth.anatomy`) are
registered to the subject's trace (SimpleITK, affine, Mattes mutual
information inside the subject's head mask); lesions are drawn on the MNI
lattice in vascular territories (:data:`TERRITORIES`: MCA, ACA, PCA,
lacunar, brainstem, cerebellar, multiple emboli), restricted to parenchyma
and to one hemisphere above the tentorium (:mod:`models.synth.lesions`), and
mapped into the subject through the registration.

An affine registration does not put MNI parenchyma exactly on the subject's
(brain-mask Dice about 0.76-0.79 on the shared scans): mapped alone, a cortical
lesion spilled into the subject's sulci, skull and scalp, where the "lesion"
changed no pixel (no tissue, no signal) yet was counted in the truth (27 % of
the truth voxels of one Siemens subject lay outside the service's brain mask,
where the service never counts a lesion).  So the lesion fraction is also
multiplied by the subject's own parenchymal fraction (:func:`subject_parenchyma`:
the service's brain mask, times the tissue share of the voxel read off its ADC
between parenchyma and CSF): an infarct lives only in the subject's tissue, and
the truth only where the image shows it.  A draw that keeps less than half of
its lesion in the subject's tissue is drawn again in the same territory
(:data:`MIN_KEPT_FRACTION`).

Output: a case folder (``CASE/dicom`` with every source file, pixel data edited
where the lesion falls, new Study/Series/SOP/Frame-of-Reference UIDs, all else
as the scanner wrote it, so the real intake reads it; ``CASE/truth/mask.npy``
on the DWI grid that intake builds; ``truth.json`` with the subject, scanner,
lesions and provenance).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid
from scipy import ndimage as ndi

from models.synth.anatomy import Anatomy, load_anatomy
from models.synth.lesions import LesionClass, LesionField, LesionSite, LesionSpec, rasterise_lesions
from service.domain import DiffusionStudy, ImageRole, ImageVolume
from service.intake import load_study
from service.intake.planes import ImagePlane, planes_of, resolve_series_conventions
from service.preprocess import brain_mask

log = logging.getLogger(__name__)

#: Lesion ADC range (mm2/s) and relative T2 (S0) increase of an acute infarct.
LESION_ADC_RANGE = (0.25e-3, 0.60e-3)
T2_INCREASE_RANGE = (0.05, 0.30)
#: A truth voxel is lesion when at least this fraction of it is.
TRUTH_FRACTION = 0.5
#: ADC (1e-6 mm2/s) of parenchyma and of CSF: a voxel's tissue share is read off its ADC
#: as a linear mix of the two (grey matter 750-900, white matter 650-800, CSF 2,800-3,200).
PARENCHYMA_ADC = 800.0
CSF_ADC = 3000.0
#: A drawn lesion is kept only if at least this share of its truth voxels lies in the
#: subject's tissue; otherwise it is drawn again (at most :data:`MAX_DRAWS` times).
MIN_KEPT_FRACTION = 0.5
MAX_DRAWS = 20

#: Vascular territories: (name, probability, size class weights, site, MNI rule).
#: The MNI rules are coarse boxes (mm) inside which candidate centres are drawn;
#: the lesion shape itself comes from :func:`models.synth.lesions.rasterise_lesions`.
TERRITORIES: dict[str, float] = {
    "MCA": 0.32,
    "ACA": 0.08,
    "PCA": 0.12,
    "lacunar": 0.15,
    "brainstem": 0.08,
    "cerebellar": 0.10,
    "emboli": 0.15,
}

_VOLUME_RANGES_ML: dict[str, tuple[float, float]] = {
    "MCA": (1.0, 120.0),
    "ACA": (1.0, 30.0),
    "PCA": (1.0, 50.0),
    "lacunar": (0.15, 1.5),
    "brainstem": (0.15, 3.0),
    "cerebellar": (0.3, 20.0),
    "emboli": (0.05, 0.8),  # each embolus
}


@dataclass(frozen=True, slots=True)
class InsertedLesion:
    territory: str
    centre_mni_mm: tuple[float, float, float]
    target_volume_ml: float
    adc_mm2_s: float
    t2_increase: float


@dataclass(frozen=True, slots=True)
class Registration:
    """Subject LPS (mm) -> MNI RAS (mm) as ``ras = matrix @ lps + offset``; quality as Dice."""

    matrix: npt.NDArray[np.float64]
    offset: npt.NDArray[np.float64]
    brain_dice: float

    def to_mni_ras(self, lps: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(lps @ self.matrix.T + self.offset)

    @property
    def mni_per_patient_volume(self) -> float:
        return float(abs(np.linalg.det(self.matrix)))


# ---------------------------------------------------------------------------
# Registration of the MNI anatomy to the subject


def _mni_image(anatomy: Anatomy) -> sitk.Image:
    """A b1000-like MNI image (GM brighter than WM, little CSF) in LPS, for registration."""
    t = anatomy.tissues
    image = 1.25 * t[..., 0] + 1.0 * t[..., 1] + 0.2 * t[..., 2] + 0.1 * t[..., 3]
    out = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    # lattice (z, y, x) -> sitk index (x, y, z) = lattice (k, j, i); affine columns reorder.
    m = anatomy.index_to_ras
    ras_of_sitk_index = np.stack([m[:3, 2], m[:3, 1], m[:3, 0]], axis=1)
    flip = np.diag([-1.0, -1.0, 1.0])  # RAS -> LPS
    lps = flip @ ras_of_sitk_index
    spacing = np.linalg.norm(lps, axis=0)
    out.SetSpacing([float(s) for s in spacing])
    out.SetDirection([float(v) for v in (lps / spacing).ravel()])
    out.SetOrigin([float(v) for v in flip @ m[:3, 3]])
    return out


def register_mni(dwi: ImageVolume, anatomy: Anatomy | None = None) -> Registration:
    """Affine MNI -> subject registration on the high-b trace (a few seconds on 2 cores)."""
    from service.imaging import as_sitk

    anatomy = anatomy or load_anatomy()
    fixed = sitk.Cast(as_sitk(dwi), sitk.sitkFloat32)
    head = brain_mask(dwi)
    fixed_mask = sitk.Cast(as_sitk(dwi, head.astype(np.float32)), sitk.sitkUInt8)
    moving = _mni_image(anatomy)
    initial = sitk.CenteredTransformInitializer(
        sitk.Cast(fixed * sitk.Cast(fixed_mask, sitk.sitkFloat32), sitk.sitkFloat32), moving,
        sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricFixedMask(fixed_mask)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200, relaxationFactor=0.6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed, moving)
    affine = sitk.AffineTransform(initial)
    a = np.asarray(affine.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(affine.GetCenter(), dtype=np.float64)
    translation = np.asarray(affine.GetTranslation(), dtype=np.float64)
    # T(x) = A (x - c) + c + t maps subject LPS -> MNI LPS; then LPS -> RAS.
    flip = np.diag([-1.0, -1.0, 1.0])
    matrix = flip @ a
    offset = flip @ (-a @ centre + centre + translation)
    registration = Registration(matrix=matrix, offset=offset, brain_dice=0.0)
    dice = _brain_dice(dwi, head, registration, anatomy)
    log.info("MNI registration: brain-mask Dice %.3f, scale %.3f", dice,
             registration.mni_per_patient_volume ** (-1 / 3))
    return Registration(matrix=matrix, offset=offset, brain_dice=dice)


def _brain_dice(dwi: ImageVolume, head: npt.NDArray[np.bool_], registration: Registration,
                anatomy: Anatomy) -> float:
    """Dice of the subject's head mask and the registered MNI intracranial volume."""
    idx = np.argwhere(np.ones(dwi.shape, dtype=bool))
    lps = idx[:, ::-1] @ dwi.affine()[:3, :3].T + dwi.affine()[:3, 3]
    t = anatomy.tissues
    icv = (t[..., 0] + t[..., 1] + t[..., 2]).astype(np.float32)
    values = _sample_lattice(icv, anatomy, registration.to_mni_ras(lps)).reshape(dwi.shape)
    registered = values > 0.5
    inter = float((registered & head).sum())
    return 2.0 * inter / max(float(registered.sum() + head.sum()), 1.0)


def _sample_lattice(field: npt.NDArray[np.float32], anatomy: Anatomy, ras: npt.NDArray[np.float64],
                    box: tuple[slice, slice, slice] | None = None) -> npt.NDArray[np.float32]:
    """Trilinear samples of a lattice field (or of a sub-box of the lattice) at RAS points."""
    ras_to_index = np.linalg.inv(anatomy.index_to_ras)
    ijk = ras @ ras_to_index[:3, :3].T + ras_to_index[:3, 3]
    if box is not None:
        ijk = ijk - np.array([s.start for s in box], dtype=np.float64)
    return np.asarray(
        ndi.map_coordinates(field, ijk.T, order=1, mode="constant", cval=0.0), dtype=np.float32
    )


# ---------------------------------------------------------------------------
# Lesion planning in vascular territories


def _territory_candidates(anatomy: Anatomy, territory: str) -> npt.NDArray[np.int64]:
    """Flat lattice indices of plausible centres (parenchyma > 0.8) of ``territory``."""
    shape = anatomy.shape
    ijk = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    par = anatomy.parenchyma.reshape(-1)
    keep = par > 0.8
    ras = anatomy.ras_of_index(ijk[keep])
    x, y, z = ras[:, 0], ras[:, 1], ras[:, 2]
    ax = np.abs(x)
    gm = anatomy.tissues[..., 0].reshape(-1)[keep] > anatomy.tissues[..., 1].reshape(-1)[keep]
    rules = {
        "MCA": (ax > 22) & (y > -75) & (y < 45) & (z > -15) & (z < 65),
        "ACA": (ax < 18) & (y > -45) & (z > 15),
        "PCA": ((y < -65) & (z > -10)) | ((y < -25) & (y > -65) & (z > -25) & (z < 5) & (ax > 15) & (ax < 40)),
        "lacunar": (ax > 8) & (ax < 30) & (y > -30) & (y < 20) & (z > -5) & (z < 25) & ~gm,
        "brainstem": (ax < 9) & (y > -40) & (y < -15) & (z > -50) & (z < -12),
        "cerebellar": (ax > 8) & (ax < 48) & (y < -45) & (y > -90) & (z < -20) & (z > -60),
        "emboli": (ax > 10) & (z > -10) & gm,
    }
    return np.flatnonzero(keep)[rules[territory]]


_candidate_cache: dict[str, npt.NDArray[np.int64]] = {}


def plan_inserted_lesions(rng: np.random.Generator, anatomy: Anatomy,
                          lesion_class: LesionClass | None = None,
                          territory: str | None = None) -> list[InsertedLesion]:
    """Draw one territorial infarct, a lacune, a brainstem/cerebellar infarct or emboli.

    ``lesion_class`` (small/medium/large) narrows the volume; NONE returns no lesion.
    ``territory`` (a key of :data:`TERRITORIES`) fixes the territory instead of drawing it.
    """
    if lesion_class is LesionClass.NONE:
        return []
    names = list(TERRITORIES)
    if lesion_class is not None:
        # Only territories whose lesions can reach the size class (no "large" lacune).
        c_lo, c_hi = lesion_class.volume_range_ml
        names = [
            n for n in names
            if _VOLUME_RANGES_ML[n][1] * (6 if n == "emboli" else 1) > c_lo and _VOLUME_RANGES_ML[n][0] < c_hi
        ]
    p = np.array([TERRITORIES[n] for n in names])
    drawn = names[int(rng.choice(len(names), p=p / p.sum()))]
    if territory is None:
        territory = drawn
    elif territory not in TERRITORIES:
        raise ValueError(f"unknown territory {territory!r}; one of {', '.join(TERRITORIES)}")
    lo, hi = _VOLUME_RANGES_ML[territory]
    if lesion_class is not None and territory != "emboli":
        c_lo, c_hi = lesion_class.volume_range_ml
        lo, hi = max(lo, c_lo), min(hi, c_hi)
        if lo >= hi:  # the class does not fit this territory: take the class range
            lo, hi = c_lo, c_hi
    count = int(rng.integers(2, 7)) if territory == "emboli" else 1
    if territory not in _candidate_cache:
        _candidate_cache[territory] = _territory_candidates(anatomy, territory)
    candidates = _candidate_cache[territory]
    side = 1.0 if rng.random() < 0.5 else -1.0
    lesions = []
    for _ in range(count):
        for _attempt in range(50):
            flat = int(candidates[rng.integers(len(candidates))])
            ijk = np.array(np.unravel_index(flat, anatomy.shape), dtype=np.float64)
            centre = anatomy.ras_of_index(ijk[None, :])[0]
            # Emboli of one event mostly share a hemisphere; midline territories do not care.
            if territory in ("brainstem", "ACA") or centre[0] * side > 0 or (
                territory == "emboli" and rng.random() < 0.25
            ):
                break
        volume = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        lesions.append(
            InsertedLesion(
                territory=territory,
                centre_mni_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                target_volume_ml=volume,
                adc_mm2_s=float(rng.uniform(*LESION_ADC_RANGE)),
                t2_increase=float(rng.uniform(*T2_INCREASE_RANGE)),
            )
        )
    return lesions


def _site(territory: str, anatomy: Anatomy, centre: Sequence[float]) -> LesionSite:
    if territory in ("brainstem", "cerebellar"):
        return LesionSite.INFRATENTORIAL
    if territory == "lacunar":
        return LesionSite.SUBCORTICAL
    return LesionSite.CORTICAL


def rasterise(rng: np.random.Generator, lesions: Sequence[InsertedLesion], anatomy: Anatomy,
              registration: Registration) -> LesionField | None:
    specs = [
        LesionSpec(
            site=_site(lesion.territory, anatomy, lesion.centre_mni_mm),
            centre_mni_mm=lesion.centre_mni_mm,
            target_volume_ml=lesion.target_volume_ml,
            adc=lesion.adc_mm2_s,
            s0_increase=lesion.t2_increase,
        )
        for lesion in lesions
    ]
    return rasterise_lesions(rng, specs, anatomy, mni_per_patient_volume=registration.mni_per_patient_volume)


# ---------------------------------------------------------------------------
# Partial-volume lesion fraction at image pixels


@dataclass(frozen=True, slots=True)
class _PlaneGrid:
    position: npt.NDArray[np.float64]
    row_cosine: npt.NDArray[np.float64]
    column_cosine: npt.NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    def key(self) -> tuple[float, ...]:
        return tuple(np.round(np.concatenate([self.position, self.row_cosine, self.column_cosine]), 2)) + (
            round(self.pixel_spacing[0], 3), round(self.pixel_spacing[1], 3), self.rows, self.columns)


def lesion_fields_at(
    grid: _PlaneGrid, thickness_mm: float, field: LesionField, anatomy: Anatomy,
    registration: Registration, *, subsamples: tuple[int, int, int] = (2, 2, 5),
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(fraction w, lesion ADC mm2/s, T2 increase) per pixel of one plane.

    ``w`` averages the lesion occupancy over the pixel (in-plane sub-samples)
    and the slice thickness (through-plane sub-samples): the partial volume a
    real voxel at the lesion edge has.
    """
    normal = np.cross(grid.row_cosine, grid.column_cosine)
    sr, sc, sz = subsamples
    rows = (np.arange(grid.rows * sr) + 0.5) / sr - 0.5
    cols = (np.arange(grid.columns * sc) + 0.5) / sc - 0.5
    through = ((np.arange(sz) + 0.5) / sz - 0.5) * thickness_mm
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    base = (grid.position[None, None, :]
            + rr[..., None] * grid.pixel_spacing[0] * grid.column_cosine
            + cc[..., None] * grid.pixel_spacing[1] * grid.row_cosine)
    occupancy = np.zeros((grid.rows, grid.columns), dtype=np.float32)
    adc = np.zeros_like(occupancy)
    t2 = np.zeros_like(occupancy)
    for offset in through:
        lps = (base + offset * normal).reshape(-1, 3)
        ras = registration.to_mni_ras(lps)
        occ = _sample_lattice(field.occupancy, anatomy, ras, field.box).reshape(rr.shape)
        occupancy += occ.reshape(grid.rows, sr, grid.columns, sc).mean(axis=(1, 3))
        if occ.any():
            a = _sample_lattice(field.adc * field.occupancy, anatomy, ras, field.box).reshape(rr.shape)
            s = _sample_lattice(field.s0_increase * field.occupancy, anatomy, ras, field.box).reshape(rr.shape)
            adc += a.reshape(grid.rows, sr, grid.columns, sc).mean(axis=(1, 3))
            t2 += s.reshape(grid.rows, sr, grid.columns, sc).mean(axis=(1, 3))
    w = occupancy / sz
    with np.errstate(invalid="ignore", divide="ignore"):
        lesion_adc = np.where(occupancy > 0, adc / np.maximum(occupancy, 1e-9), 0.0)
        lesion_t2 = np.where(occupancy > 0, t2 / np.maximum(occupancy, 1e-9), 0.0)
    return (np.clip(w, 0.0, 1.0).astype(np.float32), lesion_adc.astype(np.float32),
            lesion_t2.astype(np.float32))


# ---------------------------------------------------------------------------
# Writing the edited study


def subject_parenchyma(study: DiffusionStudy, smoothed_adc: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Share of each DWI voxel that is the subject's brain parenchyma (0..1), from its own images.

    Inside the service's brain mask (:func:`service.preprocess.brain_mask`, the mask outside of
    which the service never counts a lesion), the tissue share of a voxel that mixes parenchyma
    and CSF, read off its (lightly smoothed) ADC: 1 at or below :data:`PARENCHYMA_ADC`, 0 at
    :data:`CSF_ADC`, linear between.  Outside the mask (skull, scalp, air) 0.
    """
    brain = brain_mask(study.dwi)
    tissue = np.clip((CSF_ADC - smoothed_adc) / (CSF_ADC - PARENCHYMA_ADC), 0.0, 1.0)
    return np.asarray(tissue * brain, dtype=np.float32)


def _grid_of(plane: ImagePlane) -> _PlaneGrid:
    g = plane.geometry
    assert g is not None
    return _PlaneGrid(np.asarray(g.position, dtype=np.float64), np.asarray(g.row_cosine, dtype=np.float64),
                      np.asarray(g.column_cosine, dtype=np.float64), g.pixel_spacing, g.rows, g.columns)


def _sample_volume(volume: ImageVolume, grid: _PlaneGrid, values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Linear samples of ``values`` (on ``volume``'s grid) at the pixel centres of ``grid``."""
    rr, cc = np.meshgrid(np.arange(grid.rows), np.arange(grid.columns), indexing="ij")
    lps = (grid.position[None, None, :] + rr[..., None] * grid.pixel_spacing[0] * grid.column_cosine
           + cc[..., None] * grid.pixel_spacing[1] * grid.row_cosine).reshape(-1, 3)
    inverse = np.linalg.inv(volume.affine())
    crs = lps @ inverse[:3, :3].T + inverse[:3, 3]  # (column, row, slice)
    out = ndi.map_coordinates(values, crs[:, ::-1].T, order=1, mode="nearest")
    return np.asarray(out, dtype=np.float32).reshape(grid.rows, grid.columns)


def _new_uids(datasets: Sequence[pydicom.Dataset]) -> dict[str, str]:
    """Fresh UIDs for every study, series, instance and frame of reference UID in the files."""
    mapping: dict[str, str] = {}
    for ds in datasets:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            uid = str(ds.get(keyword, "") or "")
            if uid and uid not in mapping:
                mapping[uid] = generate_uid()
    return mapping


def _apply_uids(ds: pydicom.Dataset, mapping: dict[str, str]) -> None:
    for keyword in _UID_KEYWORDS:
        uid = str(ds.get(keyword, "") or "")
        if uid in mapping:
            setattr(ds, keyword, mapping[uid])
    if hasattr(ds, "file_meta") and "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _edited_value(plane: ImagePlane, values: npt.NDArray[np.float32], w: npt.NDArray[np.float32],
                  lesion_adc_micro: npt.NDArray[np.float32], t2: npt.NDArray[np.float32],
                  subject_adc_micro: npt.NDArray[np.float32]) -> npt.NDArray[np.float32] | None:
    """The plane's new Modality-LUT values, or None for planes the lesion does not change."""
    role = plane.role
    smooth = ndi.gaussian_filter(values, 1.0)
    if role in (ImageRole.DWI, ImageRole.DIRECTIONAL):
        b = float(plane.b_value or 0.0)
        delta_adc = (lesion_adc_micro - subject_adc_micro) * 1e-6
        factor = (1.0 + w * t2) * np.exp(-b * w * delta_adc)
    elif role is ImageRole.B0:
        factor = 1.0 + w * t2
    elif role is ImageRole.ADC:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(subject_adc_micro > 0, lesion_adc_micro / np.maximum(subject_adc_micro, 1.0), 1.0)
        factor = 1.0 + w * (ratio - 1.0)
    else:
        return None
    return np.asarray(values + smooth * (factor - 1.0), dtype=np.float32)


class SourceStudy:
    """A real study read once (files, planes, DWI/ADC, MNI registration) to insert lesions into.

    Reading a 1,400-file Philips study takes most of a minute; every case
    drawn from it reuses this.  Each :meth:`write_case` edits copies of the
    affected pixel arrays, writes every file with fresh UIDs, and leaves the
    source datasets as they were.
    """

    def __init__(self, files: Sequence[Path], *, subject: str = "",
                 anatomy: Anatomy | None = None) -> None:
        self.anatomy = anatomy or load_anatomy()
        self.subject = subject
        self.files = sorted(files)
        self.study = load_study(self.files)
        self.registration = register_mni(self.study.dwi, self.anatomy)
        self.datasets: dict[Path, pydicom.Dataset] = {}
        planes: list[ImagePlane] = []
        for path in self.files:
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # not DICOM (a DICOMDIR's companions, notes): not copied
                continue
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            self.datasets[path] = ds
            planes.extend(planes_of(path, ds))
        self.planes = [
            p for p in resolve_series_conventions(planes)
            if p.geometry is not None
            and p.role in (ImageRole.DWI, ImageRole.DIRECTIONAL, ImageRole.B0, ImageRole.ADC)
        ]
        self._values = {id(p): p.values() for p in self.planes}  # decoded once, before any edit
        self._original = {id(ds): ds.PixelData for ds in self.datasets.values()}
        self._subject_adc = ndi.gaussian_filter(
            np.clip(self.study.adc.voxels, 0.0, 4000.0), (0.0, 1.0, 1.0)
        ).astype(np.float32)
        self._adc_at: dict[tuple[float, ...], npt.NDArray[np.float32]] = {}
        self.parenchyma = subject_parenchyma(self.study, self._subject_adc)
        self._parenchyma_at: dict[tuple[float, ...], npt.NDArray[np.float32]] = {}
        self.thickness_mm = float(self.study.dwi.slice_spacing)

    def _subject_adc_at(self, grid: _PlaneGrid) -> npt.NDArray[np.float32]:
        key = grid.key()
        if key not in self._adc_at:
            self._adc_at[key] = _sample_volume(self.study.dwi, grid, self._subject_adc)
        return self._adc_at[key]

    def _tissue_at(self, grid: _PlaneGrid) -> npt.NDArray[np.float32]:
        key = grid.key()
        if key not in self._parenchyma_at:
            self._parenchyma_at[key] = _sample_volume(self.study.dwi, grid, self.parenchyma)
        return self._parenchyma_at[key]

    def _edit(self, field: LesionField) -> dict[int, npt.NDArray[Any]]:
        """Edited pixel arrays of the objects the lesion touches, by ``id(dataset)``."""
        arrays: dict[int, npt.NDArray[Any]] = {}
        cache: dict[tuple[float, ...], tuple[npt.NDArray[np.float32], ...]] = {}
        for plane in self.planes:
            grid = _grid_of(plane)
            key = grid.key()
            if key not in cache:
                w, lesion_adc, t2 = lesion_fields_at(grid, self.thickness_mm, field, self.anatomy, self.registration)
                cache[key] = (w * self._tissue_at(grid), lesion_adc, t2)
            w, lesion_adc, t2 = cache[key]
            if not (w > 1e-3).any():
                continue
            new = _edited_value(plane, self._values[id(plane)], w, lesion_adc * 1e6, t2,
                                self._subject_adc_at(grid))
            if new is None:
                continue
            ds = self.datasets[plane.source.path]
            if id(ds) not in arrays:
                arrays[id(ds)] = np.array(ds.pixel_array)
            array = arrays[id(ds)]
            slope, intercept = plane.rescale
            stored = np.rint((new - intercept) / slope)
            if np.issubdtype(array.dtype, np.integer):
                info = np.iinfo(array.dtype)
                stored = np.clip(stored, info.min, info.max)
            target = array
            if plane.pixels is not None and plane.pixels.frame is not None and array.ndim == 3:
                target = array[plane.pixels.frame]
            if plane.pixels is not None and plane.pixels.tile is not None:
                r0, r1, c0, c1 = plane.pixels.tile
                target[r0:r1, c0:c1] = stored.astype(array.dtype)
            else:
                target[...] = stored.astype(array.dtype)
        return arrays

    def truth(self, field: LesionField | None) -> npt.NDArray[np.bool_]:
        """The truth mask on the DWI grid intake builds (lesion fraction in tissue >= 0.5)."""
        return self._truth_and_drawn(field)[0]

    def _truth_and_drawn(self, field: LesionField | None) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """(truth, drawn): the lesion fraction in the subject's tissue >= 0.5, and the fraction as
        drawn through the registration alone >= 0.5 (for the share kept, :data:`MIN_KEPT_FRACTION`)."""
        dwi = self.study.dwi
        truth = np.zeros(dwi.shape, dtype=bool)
        drawn = np.zeros(dwi.shape, dtype=bool)
        if field is None:
            return truth, drawn
        affine = dwi.affine()
        for k in range(dwi.shape[0]):
            grid = _PlaneGrid(affine[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine[:3, 3],
                              np.asarray(dwi.row_cosine), np.asarray(dwi.column_cosine),
                              dwi.pixel_spacing, dwi.shape[1], dwi.shape[2])
            w, _, _ = lesion_fields_at(grid, self.thickness_mm, field, self.anatomy, self.registration)
            drawn[k] = w >= TRUTH_FRACTION
            truth[k] = w * self.parenchyma[k] >= TRUTH_FRACTION
        return truth, drawn

    def write_case(self, case_dir: Path, rng: np.random.Generator, *,
                   lesion_class: LesionClass | None = None,
                   territory: str | None = None) -> dict[str, Any]:
        """Draw lesions, write the edited study and its truth to ``case_dir``; return truth.json."""
        draws = 0
        while True:
            draws += 1
            lesions = plan_inserted_lesions(rng, self.anatomy, lesion_class, territory)
            field = rasterise(rng, lesions, self.anatomy, self.registration) if lesions else None
            truth, drawn = self._truth_and_drawn(field)
            kept = float(truth.sum()) / float(drawn.sum()) if drawn.any() else (1.0 if field is None else 0.0)
            if draws >= MAX_DRAWS or (kept >= MIN_KEPT_FRACTION and (field is None or truth.any())):
                break
            # Draw again in the same territory, so the territories keep their shares.
            territory = lesions[0].territory
        arrays = self._edit(field) if field is not None else {}
        mapping = _new_uids(list(self.datasets.values()))
        out_dicom = case_dir / "dicom"
        out_dicom.mkdir(parents=True, exist_ok=True)
        for i, ds in enumerate(self.datasets.values()):
            saved = {k: ds.get(k) for k in _UID_KEYWORDS}
            media = ds.file_meta.get("MediaStorageSOPInstanceUID")
            try:
                if id(ds) in arrays:
                    ds.PixelData = np.ascontiguousarray(arrays[id(ds)]).tobytes()
                _apply_uids(ds, mapping)
                ds.save_as(out_dicom / f"{i:05d}.dcm", enforce_file_format=False)
            finally:
                ds.PixelData = self._original[id(ds)]
                for k, v in saved.items():
                    if v is not None:
                        setattr(ds, k, v)
                if media is not None:
                    ds.file_meta.MediaStorageSOPInstanceUID = media
        (case_dir / "truth").mkdir(parents=True, exist_ok=True)
        np.save(case_dir / "truth" / "mask.npy", truth)
        record: dict[str, Any] = {
            "kind": "real anatomy with inserted lesions",
            "subject": self.subject,
            "manufacturer": self.study.manufacturer,
            "b_value": self.study.b_value,
            "lesions": [asdict(lesion) for lesion in lesions],
            "territory": lesions[0].territory if lesions else "none",
            "truth_volume_ml": float(truth.sum()) * self.study.dwi.voxel_volume_ml,
            "registration_brain_dice": round(self.registration.brain_dice, 4),
            "kept_in_subject_tissue": round(kept, 4),
            "draws": draws,
            "edited_objects": len(arrays),
        }
        (case_dir / "truth" / "truth.json").write_text(json.dumps(record, indent=2))
        return record


_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def insert_cases(
    source: Path, out_dir: Path, n_cases: int, seed: int, *, subject: str = "",
    none_fraction: float = 0.1,
) -> list[Path]:
    """``n_cases`` case folders from one real study (a folder of its DICOM files).

    About 10 % (``none_fraction``) get no lesion: the model must also learn
    that a real healthy brain with its artefacts has none.
    """
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    study = SourceStudy(files, subject=subject)
    out: list[Path] = []
    for i in range(n_cases):
        rng = np.random.default_rng([seed, i])
        lesion_class = LesionClass.NONE if rng.random() < none_fraction else None
        case = out_dir / f"{subject or source.name}_{seed}_{i:04d}"
        record = study.write_case(case, rng, lesion_class=lesion_class)
        log.info("%s: %s %.2f mL", case.name, record["territory"], record["truth_volume_ml"])
        out.append(case)
    return out


__all__ = [
    "LESION_ADC_RANGE",
    "TERRITORIES",
    "T2_INCREASE_RANGE",
    "InsertedLesion",
    "Registration",
    "SourceStudy",
    "insert_cases",
    "plan_inserted_lesions",
    "register_mni",
    "subject_parenchyma",
]
