"""Stack single-frame MR images into an :class:`ImageVolume` in patient coordinates.

Slices are sorted along the slice normal (never by InstanceNumber, which
scanners number in acquisition order); duplicates, mixed orientations, mixed
matrices and irregular spacing are refused with a specific reason instead of
being silently papered over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from service.domain import ImageVolume
from service.errors import GeometryError, UnreadableImage

ORIENTATION_TOLERANCE = 1e-3
SPACING_TOLERANCE = 0.1  # relative deviation of a gap from the median gap
MIN_SLICES = 3


@dataclass(frozen=True, slots=True)
class SliceGeometry:
    position: np.ndarray
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int


def slice_geometry(ds: Dataset) -> SliceGeometry:
    """Read the plane geometry of one classic image; GeometryError if absent."""
    try:
        position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise GeometryError("image without usable plane geometry (IPP/IOP/PixelSpacing)") from exc
    if position.shape != (3,) or orientation.shape != (6,) or len(spacing) != 2:
        raise GeometryError("malformed ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    if not (
        abs(np.linalg.norm(row_cosine) - 1) < 1e-2 and abs(np.linalg.norm(column_cosine) - 1) < 1e-2
    ):
        raise GeometryError("ImageOrientationPatient is not made of unit vectors")
    return SliceGeometry(
        position=position,
        row_cosine=row_cosine / np.linalg.norm(row_cosine),
        column_cosine=column_cosine / np.linalg.norm(column_cosine),
        pixel_spacing=(spacing[0], spacing[1]),
        rows=rows,
        columns=columns,
    )


def pixel_values(ds: Dataset) -> np.ndarray:
    """Stored pixels with the Modality LUT (rescale slope/intercept) applied."""
    try:
        array = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for broken pixel data
        raise UnreadableImage(f"unreadable pixel data: {type(exc).__name__}") from exc
    if array.ndim != 2:
        raise UnreadableImage(f"expected a single-frame image, got pixel array {array.shape}")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0 or intercept != 0.0:
        array = array * np.float32(slope) + np.float32(intercept)
    return array


def sort_along_normal(datasets: Sequence[Dataset]) -> tuple[list[Dataset], np.ndarray]:
    """Sort images by their position along the common slice normal.

    Returns the sorted images and their positions along the normal (mm).
    """
    if not datasets:
        raise GeometryError("no images to stack")
    geometries = [slice_geometry(ds) for ds in datasets]
    first = geometries[0]
    for g in geometries[1:]:
        if (
            np.abs(g.row_cosine - first.row_cosine).max() > ORIENTATION_TOLERANCE
            or np.abs(g.column_cosine - first.column_cosine).max() > ORIENTATION_TOLERANCE
        ):
            raise GeometryError("images of one series have different orientations")
        if (g.rows, g.columns) != (first.rows, first.columns):
            raise GeometryError("images of one series have different matrix sizes")
        if np.abs(np.subtract(g.pixel_spacing, first.pixel_spacing)).max() > 1e-3:
            raise GeometryError("images of one series have different pixel spacings")
    normal = np.cross(first.row_cosine, first.column_cosine)
    distances = np.asarray([float(g.position @ normal) for g in geometries])
    order = np.argsort(distances, kind="stable")
    return [datasets[i] for i in order], distances[order]


def stack_slices(datasets: Sequence[Dataset]) -> tuple[ImageVolume, list[Dataset]]:
    """Build a volume from the images of one b-value (or one ADC map).

    Returns the volume and the images in volume slice order.
    """
    ordered, distances = sort_along_normal(datasets)
    if len(ordered) < MIN_SLICES:
        raise GeometryError(f"too few slices ({len(ordered)} < {MIN_SLICES})")
    gaps = np.diff(distances)
    if np.any(gaps < 1e-3):
        raise GeometryError("duplicate slice positions (two images at the same location)")
    median_gap = float(np.median(gaps))
    if np.any(np.abs(gaps - median_gap) > SPACING_TOLERANCE * median_gap):
        raise GeometryError(
            "inconsistent slice spacing (missing slices?): gaps from "
            f"{gaps.min():.2f} to {gaps.max():.2f} mm"
        )
    first = slice_geometry(ordered[0])
    normal = np.cross(first.row_cosine, first.column_cosine)
    # In-plane offsets between slices must be along the normal (no shear).
    for ds, d in zip(ordered, distances, strict=True):
        expected = first.position + (d - distances[0]) * normal
        if np.abs(slice_geometry(ds).position - expected).max() > 0.5:
            raise GeometryError("slices are not stacked along their normal (sheared volume)")
    voxels = np.stack([pixel_values(ds) for ds in ordered]).astype(np.float32)
    volume = ImageVolume(
        voxels=voxels,
        origin=tuple(float(v) for v in first.position),  # type: ignore[arg-type]
        row_cosine=tuple(float(v) for v in first.row_cosine),  # type: ignore[arg-type]
        column_cosine=tuple(float(v) for v in first.column_cosine),  # type: ignore[arg-type]
        slice_cosine=tuple(float(v) for v in normal),  # type: ignore[arg-type]
        pixel_spacing=first.pixel_spacing,
        slice_spacing=median_gap,
    )
    return volume, ordered
