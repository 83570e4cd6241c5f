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

from service import metrics
from service.domain import HIGH_B_MIN, DiffusionStudy, ImageRole, ImageVolume, SourceFrame
from service.errors import (
    GeometryError,
    IncompleteStudy,
    MissingADC,
    NoDiffusionSeries,
    NoHighBValue,
    StudyRefused,
    UnreadableImage,
)
from service.imaging import resample_onto
from service.intake.adc import (
    MIN_TENSOR_DIRECTIONS,
    adc_to_micro,
    balanced_directions,
    check_computed_adc,
    check_declared_unit,
    computed_adc,
    geometric_mean,
    tensor_rank,
    tensor_trace,
)
from service.intake.planes import (
    UIH_VFRAME,
    ImagePlane,
    resolve_series_conventions,
    stack_planes,
)
from service.intake.reading import read_planes
from service.intake.volume import check_stack

log = logging.getLogger(__name__)

MIN_ADC_COVERAGE = 0.5

# Kept for callers and tests written against the first intake.
_adc_to_micro = adc_to_micro


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
    """``volume`` on the DWI grid; refused unless it covers every DWI slice and lines up.

    Nothing is ever filled in: an ADC of 17 slices resampled onto a DWI of 28
    would read 0 (or a neighbour's value) on the other 11, and a lesion there
    would be missed or invented.
    """
    if _same_grid(volume, dwi):
        return volume
    probe = volume.with_voxels(np.ones(volume.shape, dtype=np.float32))
    covered = resample_onto(probe, dwi, linear=False).voxels.reshape(dwi.shape[0], -1).mean(axis=1)
    if float(covered.max()) < MIN_ADC_COVERAGE:
        raise GeometryError(
            f"{what} covers only {float(covered.mean()):.0%} of the DWI volume (non-overlapping volumes)"
        )
    missing = np.flatnonzero(covered < 0.5 * float(covered.max()))
    if missing.size:
        n = dwi.shape[0]
        raise IncompleteStudy(
            f"{what} covers {n - missing.size} of {n} DWI slices (nothing at DWI slice(s) "
            f"{_ranges(missing + 1)}); the {what.split()[0]} series may be incomplete or from "
            "another acquisition: resend the study"
        )
    resampled = resample_onto(volume, dwi)
    _check_alignment(resampled, dwi, what)
    notes.append(f"{what} resampled onto the DWI grid")
    return resampled


#: Largest distance (mm) between the head centres of DWI and ADC that still counts as aligned.
MAX_HEAD_OFFSET_MM = 10.0


def _check_alignment(resampled: ImageVolume, dwi: ImageVolume, what: str) -> None:
    """Refuse an ADC/b0 whose head sits elsewhere than the DWI's (a shifted or foreign header).

    The head is what has signal: above a tenth of the 99th percentile on the
    DWI and on a b0 (a low cut, so a large bright infarct cannot take the
    mask over, as it could with Otsu), tissue values (100-1600 x 1e-6 mm2/s:
    parenchyma and lesion, not CSF or the zeroed background) on an ADC map.
    Their centres agree within a few mm when both come from one acquisition,
    whatever the two grids are.
    """
    dwi_head = _signal_mask(dwi.voxels)
    values = resampled.voxels
    other_head = _signal_mask(values) if what.startswith("b0") else (values > 100) & (values < 1600)
    if dwi_head.sum() < 100 or other_head.sum() < 100:
        return
    affine = dwi.affine()
    centres = [affine[:3, :3] @ np.argwhere(m).mean(axis=0)[::-1] for m in (dwi_head, other_head)]
    offset = float(np.linalg.norm(centres[0] - centres[1]))
    if offset > MAX_HEAD_OFFSET_MM:
        raise GeometryError(
            f"{what} does not line up with the DWI: the head centres are {offset:.0f} mm apart "
            "(a shifted position in the header, or another acquisition)"
        )


def _signal_mask(voxels: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    values = np.nan_to_num(voxels)
    ceiling = float(np.percentile(values, 99))
    return values > 0.1 * ceiling if ceiling > 0 else np.zeros(values.shape, dtype=bool)


def _ranges(numbers: Iterable[int]) -> str:
    """1, 2, 3, 7 -> '1-3, 7'."""
    values = sorted(int(n) for n in numbers)
    parts: list[str] = []
    start = prev = values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


# --------------------------------------------------------------------------
# Reading


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
    mean: npt.NDArray[np.float32] = np.mean(np.stack(images), axis=0).astype(np.float32)
    return mean


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
    with metrics.stage("read"):
        planes = read_planes(paths)
    with metrics.stage("intake"):
        return _assemble(planes)


def _assemble(planes: list[ImagePlane]) -> DiffusionStudy:
    """:func:`load_study` once the files are read."""
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
    _check_dwi_complete(dwi, dwi_planes, planes)

    adc = _scanner_adc(planes, dwi, frame_of_reference, dwi_series, notes)
    adc_origin = "scanner"
    if adc is None:
        adc = _computed_adc(planes, dwi, dwi_planes, b_value, notes)
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
        # The reason stays the bare default (what operators filter on; what was
        # seen instead goes to the log), unless a known unsupported format was seen.
        log.warning("no diffusion series; %s", _seen(planes) or "no images")
        vframes = sum(1 for p in planes if p.cls.reason == UIH_VFRAME)
        if vframes:
            raise NoDiffusionSeries(
                f"no readable diffusion series: {vframes} {UIH_VFRAME}; ask the scanner or PACS "
                "to send the diffusion series as single-slice images or Enhanced MR"
            )
        raise NoDiffusionSeries()

    if not trace and not directional and not any(p.role is ImageRole.ADC for p in planes):
        # GE writes b = 0 in (0043,xx39) and Philips in (2001,xx03) on T1, fMRI and
        # ASL images: b=0 images alone (no b > 0 image, no ADC map) are not a
        # diffusion acquisition.
        series = sorted({p.series_number for p in b0})
        raise NoDiffusionSeries(
            "no diffusion series: only images with b = 0 (series "
            f"{', '.join(map(str, series[:5]))}{', ...' if len(series) > 5 else ''}); GE and Philips "
            "also mark non-diffusion images b = 0"
        )
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
        return _trace_from_directional(high_directional, planes, notes)
    b_seen = sorted({float(p.b_value) for p in trace + directional if p.b_value is not None})
    detail = f"b-values seen: {', '.join(f'{b:g}' for b in b_seen)}" if b_seen else "only b0 images"
    raise NoHighBValue(f"no high-b (>= {HIGH_B_MIN:g} s/mm2) diffusion images ({detail})")


def _trace_from_directional(
    planes: Sequence[ImagePlane], all_planes: Sequence[ImagePlane], notes: list[str]
) -> tuple[ImageVolume, list[ImagePlane], float]:
    """The trace from directional images: their geometric mean when the directions
    balance, else a diffusion-tensor fit (6+ non-collinear directions with a b0 of
    the same series, or 7+ without)."""
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
    directions = [[p.cls.direction for p in bucket if p.cls.direction is not None] for bucket in buckets]
    if all(balanced_directions(d) for d in directions):
        dwi, representatives = _combined_volume(buckets, geometric_mean, what)
        notes.append(
            f"DWI b={b_max:g} series {chosen[0].series_number}: trace computed as the geometric "
            f"mean of {len(buckets[0])} directional images per slice"
        )
        return dwi, representatives, b_max
    return _trace_from_tensor(buckets, directions, all_planes, b_max, what, base, notes)


def _trace_from_tensor(
    buckets: Sequence[Sequence[ImagePlane]],
    directions: Sequence[Sequence[tuple[float, float, float]]],
    all_planes: Sequence[ImagePlane],
    b_value: float,
    what: str,
    base: str,
    notes: list[str],
) -> tuple[ImageVolume, list[ImagePlane], float]:
    """Trace S0 exp(-b MD) per slice from a log-linear tensor fit (unbalanced directions)."""
    series_uid = buckets[0][0].series_instance_uid
    b0_at: dict[tuple[float, ...], list[ImagePlane]] = defaultdict(list)
    for p in all_planes:
        if p.role is ImageRole.B0 and p.series_instance_uid == series_uid and p.geometry is not None:
            b0_at[tuple(round(float(v), 1) for v in p.geometry.position)].append(p)
    keys = [tuple(round(float(v), 1) for v in b[0].require_geometry(what).position) for b in buckets]
    with_b0 = all(b0_at.get(k) for k in keys)
    ranks = {tensor_rank(d) for d in directions}
    fewest = min(len(d) for d in directions)
    if min(ranks) < MIN_TENSOR_DIRECTIONS or (not with_b0 and fewest < MIN_TENSOR_DIRECTIONS + 1):
        raise NoHighBValue(
            f"{base}, and their {fewest} gradient direction(s) per slice neither balance to a "
            f"trace nor determine a diffusion tensor ({min(ranks)} independent; need 6 "
            "non-collinear directions with a b0 image of the same series, or 7 without)"
        )
    counts = {len(b) for b in buckets}
    if len(counts) != 1:
        raise GeometryError(f"{what}: different numbers of images per slice position")
    stack = check_stack([b[0].require_geometry(what) for b in buckets], what=what)
    voxels = np.stack([
        tensor_trace(
            [p.values() for p in buckets[i]], directions[i], b_value,
            [p.values() for p in b0_at.get(keys[i], [])] if with_b0 else (),
        )
        for i in stack.order
    ])
    notes.append(
        f"DWI b={b_value:g} series {buckets[0][0].series_number}: trace computed from a "
        f"diffusion-tensor fit of {len(buckets[0])} directional images per slice"
        f"{' and the b0' if with_b0 else ''} (directions not balanced)"
    )
    return stack.volume(voxels.astype(np.float32)), [buckets[i][0] for i in stack.order], b_value


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
    dwi_planes: Sequence[ImagePlane],
    b_value: float,
    notes: list[str],
) -> ImageVolume:
    """ADC = -ln(S_b / S_0) / b from b0 images of the DWI's own acquisition (1e-6 mm2/s).

    Only the DWI's own series, or a series that is provably the same
    acquisition (frame of reference, slice positions, matrix, protocol, echo
    and repetition time), can supply the b0: GE and Philips write b = 0 on
    T1, fMRI and ASL images too, and an ADC from another acquisition is a
    wrong number, not an approximation.
    """
    b0 = [p for p in planes if p.role is ImageRole.B0]
    if not b0:
        raise MissingADC("no ADC map and no b0 images to compute one")
    by_series: dict[str, list[ImagePlane]] = defaultdict(list)
    for p in b0:
        by_series[p.series_instance_uid].append(p)
    chosen = _b0_of_acquisition(by_series, dwi, dwi_planes)
    what = f"b0 series {chosen[0].series_number}"
    buckets = _position_buckets(chosen, what)
    if all(len(b) == 1 for b in buckets):
        b0_volume, _ = stack_planes(chosen, what=what)
    else:
        b0_volume, _ = _combined_volume(buckets, _mean, what)
        notes.append(f"b0: mean of {len(buckets[0])} images per slice")
    b0_volume = _onto_dwi_grid(b0_volume, dwi, "b0 volume", notes)
    adc, sigma = computed_adc(b0_volume.voxels, dwi.voxels, b_value)
    check_computed_adc(adc, b0_volume.voxels, sigma)
    notes.append(
        f"ADC computed from b0 (series {chosen[0].series_number}) and the b={b_value:g} trace; "
        f"background below {5:g} x noise sigma {sigma:.3g} set to 0"
    )
    return dwi.with_voxels(adc)


def _b0_of_acquisition(
    by_series: dict[str, list[ImagePlane]], dwi: ImageVolume, dwi_planes: Sequence[ImagePlane]
) -> list[ImagePlane]:
    """The b0 planes of the DWI's acquisition; MissingADC naming what did not fit."""
    reference = dwi_planes[0]
    own = by_series.get(reference.series_instance_uid)
    if own:
        return own
    fits: list[list[ImagePlane]] = []
    rejected: list[str] = []
    for series in by_series.values():
        why = _other_acquisition(series, dwi, reference)
        if why:
            rejected.append(f"series {series[0].series_number}: {why}")
        else:
            fits.append(series)
    if not fits:
        raise MissingADC(
            f"no ADC map, and no b0 images of the DWI's acquisition (series {reference.series_number}) "
            f"to compute one; b=0 images of other acquisitions are never used ({'; '.join(rejected[:3])})"
        )
    return max(fits, key=lambda s: (len(s), s[0].series_number))


def _other_acquisition(series: Sequence[ImagePlane], dwi: ImageVolume, reference: ImagePlane) -> str:
    """Why b0 ``series`` is not part of the DWI's acquisition ("" when it is)."""
    if {p.frame_of_reference_uid for p in series} != {reference.frame_of_reference_uid}:
        return "another frame of reference"
    mismatch = {reference.acquisition.mismatch(p.acquisition) for p in series} - {""}
    if mismatch:
        return sorted(mismatch)[0]
    geometry = reference.geometry
    dwi_positions = _slice_positions(dwi)
    for p in series:
        g = p.geometry
        if g is None or geometry is None:
            return "no usable plane geometry"
        if (g.rows, g.columns) != (geometry.rows, geometry.columns) or not np.allclose(
            g.pixel_spacing, geometry.pixel_spacing, atol=1e-3
        ):
            return f"matrix {g.rows}x{g.columns}, not the DWI's {geometry.rows}x{geometry.columns}"
        if not (np.allclose(g.row_cosine, geometry.row_cosine, atol=1e-3)
                and np.allclose(g.column_cosine, geometry.column_cosine, atol=1e-3)):
            return "another slice orientation"
        if np.min(np.linalg.norm(dwi_positions - g.position, axis=1)) > 0.5:
            return "slice positions differ from the DWI's"
    return ""


def _slice_positions(volume: ImageVolume) -> npt.NDArray[np.float64]:
    """Patient position of the first pixel of every slice of ``volume`` (slices x 3)."""
    k = np.arange(volume.shape[0], dtype=np.float64)
    return np.asarray(volume.origin, dtype=np.float64) + np.outer(k * volume.slice_spacing, volume.slice_cosine)


#: A plane lies on the DWI's slice lattice when within this (mm) of one of its slice positions.
LATTICE_TOLERANCE_MM = 0.5


def _check_dwi_complete(dwi: ImageVolume, dwi_planes: Sequence[ImagePlane], planes: Sequence[ImagePlane]) -> None:
    """IncompleteStudy when images of the DWI's own acquisition cover more slices than the DWI.

    A transfer cut after 4 of 28 high-b slices still stacks into a regular
    4-slice volume; the b0 of the same series (or the scanner's ADC of the
    same acquisition) then still has 28 positions on the same slice lattice,
    and that is the evidence.  Series of other acquisitions (a thin-slice
    brainstem DWI) are not witnesses: they do not share the lattice or the
    timing.
    """
    reference = dwi_planes[0]
    n = dwi.shape[0]
    normal = np.asarray(dwi.slice_cosine, dtype=np.float64)
    origin = np.asarray(dwi.origin, dtype=np.float64)
    roles = (ImageRole.B0, ImageRole.DWI, ImageRole.DIRECTIONAL, ImageRole.ADC)
    witnesses: dict[tuple[str, str], set[int]] = defaultdict(set)
    for p in planes:
        g = p.geometry
        if p.role not in roles or g is None or p.frame_of_reference_uid != reference.frame_of_reference_uid:
            continue
        if p.series_instance_uid != reference.series_instance_uid and reference.acquisition.mismatch(
            p.acquisition
        ):
            continue
        if abs(float(np.dot(g.normal, normal))) < 0.999:
            continue
        offset = g.position - origin
        along = float(offset @ normal) / dwi.slice_spacing
        k = round(along)
        in_plane = offset - along * dwi.slice_spacing * normal
        if abs(along - k) * dwi.slice_spacing > LATTICE_TOLERANCE_MM or np.linalg.norm(in_plane) > 20.0:
            continue
        witnesses[(f"series {p.series_number}", p.role.value)].add(k)
    beyond = {key: ks for key, ks in witnesses.items() if any(k < 0 or k >= n for k in ks)}
    if beyond:
        (series, role), ks = max(beyond.items(), key=lambda item: len(item[1]))
        m = max(max(ks), n - 1) - min(min(ks), 0) + 1
        raise IncompleteStudy(
            f"DWI incomplete: {n} of {m} slices (the {role} images of {series} have {len(ks)} "
            "slice positions on the same lattice); the transfer may have been cut: resend the study"
        )
