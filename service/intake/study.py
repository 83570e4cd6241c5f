"""Assemble a :class:`DiffusionStudy` from the DICOM files of one study.

Every object is cut into image planes (:mod:`service.intake.planes`: classic
images, MOSAIC tiles, Enhanced MR frames), each classified by the vendor
conventions of :mod:`service.intake.classify`.  Then:

1. DWI: the highest-b (>= 500 s/mm2) trace planes, grouped by series and
   b-value (b0 and b-high often share one series, as GE and Philips send
   them); the largest group wins, the latest series on a tie.  When only
   directional images came, their geometric mean per slice position is the
   trace, provided the directions are balanced.
2. ADC: the scanner's map in the DWI's frame of reference (Philips appends
   it inside the DWI series), in 1e-6 mm2/s (:mod:`service.intake.adc`);
   otherwise computed from the b0 planes (the DWI's own series first).
   Either is resampled onto the DWI grid when grids differ.
3. Geometry: volumes are sorted along the slice normal and must be regular
   (:mod:`service.intake.volume`).

Every way this can fail raises a :class:`~service.errors.StudyRefused`
subclass whose reason says what was wrong and, where it helps, what was seen
instead.  Reasons name series numbers and tags, never patient data.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
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
from service.intake.adc import (
    adc_to_micro,
    balanced_directions,
    check_declared_unit,
    computed_adc,
    geometric_mean,
)
from service.intake.classify import ImageRole
from service.intake.planes import ImagePlane, planes_of, resolve_series_conventions, stack_planes
from service.intake.volume import check_stack

log = logging.getLogger(__name__)

HIGH_B_MIN = 500.0
MIN_ADC_COVERAGE = 0.5

# Kept for callers and tests written against the first intake.
_adc_to_micro = adc_to_micro


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


def as_sitk(volume: ImageVolume, voxels: np.ndarray | None = None) -> sitk.Image:
    """``volume`` (or other ``voxels`` on its grid) as a SimpleITK image in patient coordinates."""
    image = sitk.GetImageFromArray(volume.voxels if voxels is None else voxels)
    image.SetOrigin(volume.origin)
    image.SetSpacing((volume.pixel_spacing[1], volume.pixel_spacing[0], volume.slice_spacing))
    direction = np.column_stack([volume.row_cosine, volume.column_cosine, volume.slice_cosine])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def resample_onto(volume: ImageVolume, reference: ImageVolume, *, linear: bool = True) -> ImageVolume:
    """Resample ``volume`` onto the grid of ``reference`` (patient coordinates)."""
    moving = as_sitk(volume)
    ref = as_sitk(reference)
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    out = sitk.Resample(moving, ref, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)
    return reference.with_voxels(sitk.GetArrayFromImage(out).astype(np.float32))


def _same_grid(a: ImageVolume, b: ImageVolume) -> bool:
    return (
        a.shape == b.shape
        and np.allclose(a.origin, b.origin, atol=0.05)
        and np.allclose(a.row_cosine, b.row_cosine, atol=1e-3)
        and np.allclose(a.column_cosine, b.column_cosine, atol=1e-3)
        and np.allclose(a.slice_cosine, b.slice_cosine, atol=1e-3)
        and np.allclose(a.pixel_spacing, b.pixel_spacing, atol=1e-3)
        and abs(a.slice_spacing - b.slice_spacing) < 0.05
    )


def _onto_dwi_grid(volume: ImageVolume, dwi: ImageVolume, what: str, notes: list[str]) -> ImageVolume:
    """``volume`` on the DWI grid; refused when the two hardly overlap."""
    if _same_grid(volume, dwi):
        return volume
    probe = volume.with_voxels(np.ones(volume.shape, dtype=np.float32))
    coverage = float(resample_onto(probe, dwi, linear=False).voxels.mean())
    if coverage < MIN_ADC_COVERAGE:
        raise GeometryError(
            f"{what} covers only {coverage:.0%} of the DWI volume (non-overlapping volumes)"
        )
    notes.append(f"{what} resampled onto the DWI grid")
    return resample_onto(volume, dwi)


# --------------------------------------------------------------------------
# Reading


def _read_planes(paths: Sequence[Path]) -> list[ImagePlane]:
    planes: list[ImagePlane] = []
    for path in paths:
        ds = read_dicom(path)
        if ds is None:
            continue
        planes.extend(planes_of(path, ds))
    return planes


def _seen(planes: Sequence[ImagePlane]) -> str:
    """What the ignored planes were, for refusal reasons (most common first)."""
    counts = Counter(p.cls.reason or p.role.value for p in planes if p.role is ImageRole.OTHER)
    if not counts:
        return ""
    parts = [f"{n} x {reason}" for reason, n in counts.most_common(3)]
    return "seen: " + "; ".join(parts)


def _frame_of_reference(planes: Sequence[ImagePlane], what: str) -> str:
    uids = {p.frame_of_reference_uid for p in planes}
    if len(uids) != 1:
        raise GeometryError(f"{what}: images of one volume have different frames of reference")
    return uids.pop()


def _sources(planes: Sequence[ImagePlane]) -> tuple[SourceFrame, ...]:
    return tuple(p.source for p in planes)


def _position_buckets(planes: Sequence[ImagePlane], what: str) -> list[list[ImagePlane]]:
    """Planes grouped by slice position (several b0 averages, several directions)."""
    buckets: dict[tuple[float, float, float], list[ImagePlane]] = defaultdict(list)
    for plane in planes:
        geometry = plane.require_geometry(what)
        key = tuple(round(float(v), 1) for v in geometry.position)
        buckets[key].append(plane)  # type: ignore[index]
    return list(buckets.values())


def _combined_volume(
    buckets: Sequence[Sequence[ImagePlane]],
    combine: Callable[[list[npt.NDArray[np.float32]]], npt.NDArray[np.float32]],
    what: str,
) -> tuple[ImageVolume, list[ImagePlane]]:
    """One volume from several planes per position; the first plane of each bucket places it."""
    counts = {len(b) for b in buckets}
    if len(counts) != 1:
        raise GeometryError(
            f"{what}: different numbers of images per slice position ({min(counts)} to {max(counts)})"
        )
    representatives = [b[0] for b in buckets]
    stack = check_stack([p.require_geometry(what) for p in representatives], what=what)
    ordered = [buckets[i] for i in stack.order]
    voxels = np.stack([combine([p.values() for p in bucket]) for bucket in ordered])
    return stack.volume(voxels.astype(np.float32)), [b[0] for b in ordered]


def _mean(images: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
    return np.mean(np.stack(images), axis=0).astype(np.float32)


def _packaging(planes: Sequence[ImagePlane]) -> str:
    first = planes[0].source
    if first.mosaic_index is not None:
        return "Siemens MOSAIC"
    if first.frame_number is not None:
        return "multi-frame (Enhanced MR)"
    return "classic images"


# --------------------------------------------------------------------------
# The entry point


def load_study(paths: Iterable[Path]) -> DiffusionStudy:
    """Build the DWI + ADC pair of one study from its DICOM files.

    Raises a :class:`StudyRefused` subclass when the study cannot be segmented.
    """
    planes = _read_planes(sorted(paths))
    if not planes:
        raise UnreadableImage("no readable DICOM images in study")
    study_uids = {p.study_instance_uid for p in planes}
    if len(study_uids) != 1:
        raise StudyRefused("files of more than one study given to one job")
    study_uid = study_uids.pop()
    planes = resolve_series_conventions(planes)
    notes: list[str] = []

    dwi, dwi_planes, b_value = _dwi(planes, notes)
    frame_of_reference = _frame_of_reference(dwi_planes, "DWI")
    dwi_series = dwi_planes[0].series_instance_uid

    adc = _scanner_adc(planes, dwi, frame_of_reference, dwi_series, notes)
    adc_origin = "scanner"
    if adc is None:
        adc = _computed_adc(planes, dwi, b_value, frame_of_reference, dwi_series, notes)
        adc_origin = "computed"

    log.info(
        "study assembled: DWI b=%g series %d (%d slices, %s), ADC %s",
        b_value, dwi_planes[0].series_number, dwi.shape[0], _packaging(dwi_planes), adc_origin,
    )
    return DiffusionStudy(
        study_instance_uid=study_uid,
        dwi=dwi,
        b_value=b_value,
        adc=adc,
        dwi_sources=_sources(dwi_planes),
        frame_of_reference_uid=frame_of_reference,
        manufacturer=dwi_planes[0].manufacturer,
        notes=tuple(notes),
        dwi_series_instance_uid=dwi_series,
        adc_origin=adc_origin,
    )


def _dwi(planes: Sequence[ImagePlane], notes: list[str]) -> tuple[ImageVolume, list[ImagePlane], float]:
    """The high-b trace volume, its planes in slice order, and its b-value."""
    trace = [p for p in planes if p.role is ImageRole.DWI]
    directional = [p for p in planes if p.role is ImageRole.DIRECTIONAL]
    b0 = [p for p in planes if p.role is ImageRole.B0]
    if not trace and not directional and not b0:
        # The reason stays the bare default: it is a metric label and what
        # operators filter on; what was seen instead goes to the log.
        log.warning("no diffusion series; %s", _seen(planes) or "no images")
        raise NoDiffusionSeries()

    high = [p for p in trace if (p.b_value or 0.0) >= HIGH_B_MIN]
    if high:
        groups: dict[tuple[str, float], list[ImagePlane]] = defaultdict(list)
        for p in high:
            groups[(p.series_instance_uid, float(p.b_value or 0.0))].append(p)
        b_max = max(b for (_, b) in groups)
        chosen = max(
            (g for (_, b), g in groups.items() if b == b_max),
            key=lambda g: (len(g), g[0].series_number),
        )
        what = f"DWI b={b_max:g} series {chosen[0].series_number}"
        dwi, ordered = stack_planes(chosen, what=what)
        notes.append(
            f"DWI b={b_max:g} series {chosen[0].series_number} ({_packaging(ordered)}; "
            f"b-value from {ordered[0].cls.b_value_source})"
        )
        for reason in sorted({p.cls.reason for p in ordered if p.cls.reason}):
            notes.append(f"DWI: {reason}")
        return dwi, ordered, b_max

    high_directional = [p for p in directional if (p.b_value or 0.0) >= HIGH_B_MIN]
    if high_directional:
        return _trace_from_directional(high_directional, notes)
    b_seen = sorted({float(p.b_value) for p in trace + directional if p.b_value is not None})
    detail = f"b-values seen: {', '.join(f'{b:g}' for b in b_seen)}" if b_seen else "only b0 images"
    raise NoHighBValue(f"no high-b (>= {HIGH_B_MIN:g} s/mm2) diffusion images ({detail})")


def _trace_from_directional(
    planes: Sequence[ImagePlane], notes: list[str]
) -> tuple[ImageVolume, list[ImagePlane], float]:
    """Geometric mean of balanced directional images per slice position."""
    groups: dict[tuple[str, float], list[ImagePlane]] = defaultdict(list)
    for p in planes:
        groups[(p.series_instance_uid, float(p.b_value or 0.0))].append(p)
    b_max = max(b for (_, b) in groups)
    chosen = max(
        (g for (_, b), g in groups.items() if b == b_max),
        key=lambda g: (len(g), g[0].series_number),
    )
    base = "only directional diffusion images, no trace (isotropic) images"
    if any(p.cls.direction is None for p in chosen):
        raise NoHighBValue(f"{base}, and not every one states its gradient direction")
    what = f"directional DWI b={b_max:g} series {chosen[0].series_number}"
    buckets = _position_buckets(chosen, what)
    for bucket in buckets:
        directions = [p.cls.direction for p in bucket if p.cls.direction is not None]
        if not balanced_directions(directions):
            raise NoHighBValue(
                f"{base}, and their {len(directions)} gradient direction(s) per slice do not "
                "balance to a trace (need e.g. three orthogonal directions)"
            )
    dwi, representatives = _combined_volume(buckets, geometric_mean, what)
    notes.append(
        f"DWI b={b_max:g} series {chosen[0].series_number}: trace computed as the geometric "
        f"mean of {len(buckets[0])} directional images per slice"
    )
    return dwi, representatives, b_max


def _scanner_adc(
    planes: Sequence[ImagePlane],
    dwi: ImageVolume,
    frame_of_reference: str,
    dwi_series: str,
    notes: list[str],
) -> ImageVolume | None:
    adc_planes = [p for p in planes if p.role is ImageRole.ADC]
    if not adc_planes:
        return None
    by_series: dict[str, list[ImagePlane]] = defaultdict(list)
    for p in adc_planes:
        by_series[p.series_instance_uid].append(p)
    same_frame = {
        uid: series for uid, series in by_series.items()
        if {p.frame_of_reference_uid for p in series} == {frame_of_reference}
    }
    if not same_frame:
        raise GeometryError("DWI and ADC in different frames of reference")
    dwi_positions = {
        tuple(np.round(dwi.affine()[:3, :3] @ [0.0, 0.0, k] + dwi.origin, 1)) for k in range(dwi.shape[0])
    }

    def rank(series: list[ImagePlane]) -> tuple[bool, float, int, int]:
        on_grid = sum(
            1 for p in series
            if p.geometry is not None and tuple(np.round(p.geometry.position, 1)) in dwi_positions
        )
        return (series[0].series_instance_uid == dwi_series, on_grid / len(series),
                len(series), series[0].series_number)

    series = max(same_frame.values(), key=rank)
    what = f"ADC series {series[0].series_number}"
    adc, ordered = stack_planes(series, what=what)
    declared = {p.real_world for p in ordered}
    if None not in declared:
        micro = np.stack(
            [(p.stored_values() * p.real_world.slope + p.real_world.intercept) * p.real_world.to_micro
             for p in ordered if p.real_world is not None]
        ).astype(np.float32)
        unit = f"{ordered[0].real_world.unit} (RealWorldValueMapping)"  # type: ignore[union-attr]
        check_declared_unit(micro, unit)
    elif declared == {None}:
        micro, unit = adc_to_micro(adc.voxels)
    else:
        raise StudyRefused(f"{what}: only some images declare a RealWorldValueMapping unit")
    adc = _onto_dwi_grid(adc.with_voxels(micro.astype(np.float32)), dwi, "ADC map", notes)
    inside = " (inside the DWI series)" if series[0].series_instance_uid == dwi_series else ""
    notes.append(f"scanner ADC series {series[0].series_number}{inside}, unit {unit}")
    return adc


def _computed_adc(
    planes: Sequence[ImagePlane],
    dwi: ImageVolume,
    b_value: float,
    frame_of_reference: str,
    dwi_series: str,
    notes: list[str],
) -> ImageVolume:
    """ADC = -ln(S_b / S_0) / b from b0 images, on the DWI grid (1e-6 mm2/s)."""
    b0 = [p for p in planes if p.role is ImageRole.B0]
    if not b0:
        raise MissingADC("no ADC map and no b0 images to compute one")
    by_series: dict[str, list[ImagePlane]] = defaultdict(list)
    for p in b0:
        by_series[p.series_instance_uid].append(p)
    chosen = by_series.get(dwi_series) or max(
        by_series.values(), key=lambda s: (len(s), s[0].series_number)
    )
    what = f"b0 series {chosen[0].series_number}"
    if _frame_of_reference(chosen, what) != frame_of_reference:
        raise GeometryError("DWI and b0 images in different frames of reference")
    buckets = _position_buckets(chosen, what)
    if all(len(b) == 1 for b in buckets):
        b0_volume, _ = stack_planes(chosen, what=what)
    else:
        b0_volume, _ = _combined_volume(buckets, _mean, what)
        notes.append(f"b0: mean of {len(buckets[0])} images per slice")
    b0_volume = _onto_dwi_grid(b0_volume, dwi, "b0 volume", notes)
    adc, sigma = computed_adc(b0_volume.voxels, dwi.voxels, b_value)
    notes.append(
        f"ADC computed from b0 (series {chosen[0].series_number}) and the b={b_value:g} trace; "
        f"background below {5:g} x noise sigma {sigma:.3g} set to 0"
    )
    return dwi.with_voxels(adc)
