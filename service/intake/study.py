"""Assemble a :class:`DiffusionStudy` from the DICOM files of one study.

Picks the highest-b trace DWI series, the scanner's ADC map (or computes one
from b0 and the high-b trace when none was sent), checks that both share a
frame of reference and brings the ADC onto the DWI grid.  Every way this can
fail raises a :class:`~service.errors.StudyRefused` subclass with a reason.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from service.domain import DiffusionStudy, ImageVolume, SourceFrame
from service.errors import (
    GeometryError,
    MissingADC,
    NoDiffusionSeries,
    NoHighBValue,
    StudyRefused,
    UnreadableImage,
)
from service.intake.classify import ImageRole, classify_image
from service.intake.volume import stack_slices

log = logging.getLogger(__name__)

HIGH_B_MIN = 500.0
MIN_ADC_COVERAGE = 0.5


@dataclass(frozen=True, slots=True)
class _Image:
    path: Path
    ds: Dataset
    role: ImageRole
    b_value: float | None


def read_dicom(path: Path, *, stop_before_pixels: bool = False) -> Dataset | None:
    """Read a DICOM file; None when it is not DICOM at all (logged)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, KeyError) as exc:
        log.warning("skipping unreadable file %s: %s", path.name, type(exc).__name__)
        return None


def group_by_study(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """Group DICOM files by StudyInstanceUID (headers only); non-DICOM files are skipped."""
    studies: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        ds = read_dicom(path, stop_before_pixels=True)
        if ds is None or "StudyInstanceUID" not in ds:
            continue
        studies[str(ds.StudyInstanceUID)].append(path)
    return dict(studies)


def _as_sitk(volume: ImageVolume) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.voxels)
    image.SetOrigin(volume.origin)
    image.SetSpacing((volume.pixel_spacing[1], volume.pixel_spacing[0], volume.slice_spacing))
    direction = np.column_stack([volume.row_cosine, volume.column_cosine, volume.slice_cosine])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def resample_onto(volume: ImageVolume, reference: ImageVolume, *, linear: bool = True) -> ImageVolume:
    """Resample ``volume`` onto the grid of ``reference`` (patient coordinates)."""
    moving = _as_sitk(volume)
    ref = _as_sitk(reference)
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    out = sitk.Resample(moving, ref, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)
    return reference.with_voxels(sitk.GetArrayFromImage(out).astype(np.float32))


def _same_grid(a: ImageVolume, b: ImageVolume) -> bool:
    return (
        a.shape == b.shape
        and np.allclose(a.origin, b.origin, atol=0.05)
        and np.allclose(a.row_cosine, b.row_cosine, atol=1e-3)
        and np.allclose(a.column_cosine, b.column_cosine, atol=1e-3)
        and np.allclose(a.pixel_spacing, b.pixel_spacing, atol=1e-3)
        and abs(a.slice_spacing - b.slice_spacing) < 0.05
    )


def _adc_to_micro(adc: np.ndarray) -> tuple[np.ndarray, str]:
    """Bring an ADC map to 1e-6 mm2/s, inferring the unit from brain values.

    Brain parenchyma is ~600-1000 x 1e-6 mm2/s.  The median of the non-zero
    voxels of a head ADC map falls in a different decade for each unit in use.
    """
    values = adc[adc > 0]
    if values.size == 0:
        raise MissingADC("ADC map is empty")
    median = float(np.median(values))
    if 100.0 <= median <= 5000.0:
        return adc, "1e-6 mm2/s"
    if 0.1 <= median <= 5.0:
        return adc * 1000.0, "1e-3 mm2/s"
    if 1e-4 <= median <= 5e-3:
        return adc * 1e6, "mm2/s"
    if 1000.0 < median <= 50000.0:
        return adc / 10.0, "1e-7 mm2/s"
    raise StudyRefused(f"ADC map values in unknown units (median {median:.3g})")


def _read_images(paths: Sequence[Path]) -> list[_Image]:
    images: list[_Image] = []
    for path in paths:
        ds = read_dicom(path)
        if ds is None:
            continue
        cls = classify_image(ds)
        images.append(_Image(path, ds, cls.role, cls.b_value))
    return images


def _frame_of_reference(images: Sequence[_Image]) -> str:
    uids = {str(img.ds.get("FrameOfReferenceUID", "")) for img in images}
    if len(uids) != 1:
        raise GeometryError("images of one volume have different frames of reference")
    return uids.pop()


def _pick_series(groups: dict[tuple[str, float], list[_Image]], b_value: float) -> list[_Image]:
    """Of the series carrying ``b_value``, the one with most images (latest on a tie)."""
    candidates = [imgs for (_, b), imgs in groups.items() if b == b_value]

    def rank(imgs: list[_Image]) -> tuple[int, int]:
        number = imgs[0].ds.get("SeriesNumber", 0)
        return (len(imgs), int(number) if number not in (None, "") else 0)

    return max(candidates, key=rank)


def load_study(paths: Iterable[Path]) -> DiffusionStudy:
    """Build the DWI + ADC pair of one study from its DICOM files.

    Raises a :class:`StudyRefused` subclass when the study cannot be segmented.
    """
    images = _read_images(sorted(paths))
    if not images:
        raise UnreadableImage("no readable DICOM images in study")
    study_uids = {str(img.ds.get("StudyInstanceUID", "")) for img in images}
    if len(study_uids) != 1:
        raise StudyRefused("files of more than one study given to one job")
    study_uid = study_uids.pop()

    diffusion = [img for img in images if img.role in (ImageRole.DWI, ImageRole.B0)]
    trace = [img for img in images if img.role is ImageRole.DWI]
    if not diffusion and not any(img.role is ImageRole.DIRECTIONAL for img in images):
        raise NoDiffusionSeries()
    high_b = [img for img in trace if (img.b_value or 0.0) >= HIGH_B_MIN]
    if not high_b:
        if any(img.role is ImageRole.DIRECTIONAL for img in images):
            raise NoHighBValue("only directional diffusion images, no trace (isotropic) images")
        raise NoHighBValue()

    groups: dict[tuple[str, float], list[_Image]] = defaultdict(list)
    for img in high_b:
        groups[(str(img.ds.SeriesInstanceUID), float(img.b_value or 0.0))].append(img)
    b_max = max(b for (_, b) in groups)
    dwi_images = _pick_series(groups, b_max)
    frame_of_reference = _frame_of_reference(dwi_images)
    dwi, dwi_ordered = stack_slices([img.ds for img in dwi_images])
    path_of = {id(img.ds): img.path for img in dwi_images}
    sources = tuple(
        SourceFrame(
            path=path_of[id(ds)],
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
        )
        for ds in dwi_ordered
    )
    notes: list[str] = [f"DWI b={b_max:g} series {dwi_images[0].ds.get('SeriesNumber', '?')}"]

    adc = _scanner_adc(images, dwi, frame_of_reference, notes)
    if adc is None:
        adc = _computed_adc(images, dwi_images, dwi, b_max, notes)

    manufacturer = str(dwi_ordered[0].get("Manufacturer", "") or "")
    return DiffusionStudy(
        study_instance_uid=study_uid,
        dwi=dwi,
        b_value=b_max,
        adc=adc,
        dwi_sources=sources,
        frame_of_reference_uid=frame_of_reference,
        manufacturer=manufacturer,
        notes=tuple(notes),
    )


def _scanner_adc(
    images: Sequence[_Image], dwi: ImageVolume, frame_of_reference: str, notes: list[str]
) -> ImageVolume | None:
    adc_images = [img for img in images if img.role is ImageRole.ADC]
    if not adc_images:
        return None
    by_series: dict[str, list[_Image]] = defaultdict(list)
    for img in adc_images:
        by_series[str(img.ds.SeriesInstanceUID)].append(img)
    series = max(by_series.values(), key=len)
    if _frame_of_reference(series) != frame_of_reference:
        raise GeometryError("DWI and ADC in different frames of reference")
    adc, _ = stack_slices([img.ds for img in series])
    voxels, unit = _adc_to_micro(adc.voxels)
    adc = adc.with_voxels(voxels.astype(np.float32))
    if not _same_grid(adc, dwi):
        coverage_probe = adc.with_voxels(np.ones(adc.shape, dtype=np.float32))
        coverage = float(resample_onto(coverage_probe, dwi, linear=False).voxels.mean())
        if coverage < MIN_ADC_COVERAGE:
            raise GeometryError(
                f"ADC map covers only {coverage:.0%} of the DWI volume (non-overlapping volumes)"
            )
        adc = resample_onto(adc, dwi)
        notes.append("ADC resampled onto the DWI grid")
    notes.append(f"scanner ADC (series {series[0].ds.get('SeriesNumber', '?')}, unit {unit})")
    return adc


def _computed_adc(
    images: Sequence[_Image],
    dwi_images: Sequence[_Image],
    dwi: ImageVolume,
    b_value: float,
    notes: list[str],
) -> ImageVolume:
    """ADC = -ln(S_b / S_0) / b from b0 images on the DWI grid (1e-6 mm2/s)."""
    dwi_series = str(dwi_images[0].ds.SeriesInstanceUID)
    b0 = [img for img in images if img.role is ImageRole.B0]
    same_series = [img for img in b0 if str(img.ds.SeriesInstanceUID) == dwi_series]
    chosen = same_series or b0
    if not chosen:
        raise MissingADC()
    b0_volume, _ = stack_slices([img.ds for img in chosen])
    if not _same_grid(b0_volume, dwi):
        b0_volume = resample_onto(b0_volume, dwi)
    s0 = b0_volume.voxels
    sb = dwi.voxels
    valid = (s0 > 0) & (sb > 0)
    adc = np.zeros_like(sb, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc[valid] = -np.log(sb[valid] / s0[valid]) / b_value * 1e6
    adc = np.clip(adc, 0.0, 5000.0).astype(np.float32)
    notes.append("ADC computed from b0 and high-b trace")
    return dwi.with_voxels(adc)
