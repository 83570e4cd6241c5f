"""Stack image planes into an :class:`ImageVolume` in patient coordinates.

Slices are sorted along the slice normal (never by InstanceNumber, which
scanners number in acquisition order, nor by frame number); duplicates,
mixed orientations, mixed matrices, missing slices and irregular spacing are
refused with a specific reason instead of being silently papered over.  The
same checks apply whatever carried the planes: classic images, MOSAIC tiles
or Enhanced MR frames (see :mod:`service.intake.planes`), so a volume built
here is exact in patient space and a SEG frame lands on its source slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from service.domain import ImageVolume
from service.errors import GeometryError, UnreadableImage

ORIENTATION_TOLERANCE = 1e-3
SPACING_TOLERANCE = 0.1  # relative deviation of a gap from the median gap
SHEAR_TOLERANCE_MM = 0.5  # in-plane offset allowed between consecutive slice centres
MIN_SLICES = 3


@dataclass(frozen=True, slots=True)
class SliceGeometry:
    """Where one 2-D plane lies: its first pixel, axes, spacing and matrix."""

    position: np.ndarray
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.column_cosine)


def plane_geometry(
    position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    rows: int,
    columns: int,
) -> SliceGeometry:
    """Validate raw IPP/IOP/PixelSpacing values; GeometryError if unusable."""
    try:
        pos = np.asarray([float(v) for v in position], dtype=np.float64)
        iop = np.asarray([float(v) for v in orientation], dtype=np.float64)
        spacing = tuple(float(v) for v in pixel_spacing)
    except (TypeError, ValueError) as exc:
        raise GeometryError("image without usable plane geometry (IPP/IOP/PixelSpacing)") from exc
    if pos.shape != (3,) or iop.shape != (6,) or len(spacing) != 2:
        raise GeometryError("malformed ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(iop))) or min(spacing) <= 0:
        raise GeometryError("non-finite position/orientation or non-positive pixel spacing")
    row_cosine, column_cosine = iop[:3], iop[3:]
    if not (
        abs(np.linalg.norm(row_cosine) - 1) < 1e-2 and abs(np.linalg.norm(column_cosine) - 1) < 1e-2
    ):
        raise GeometryError("ImageOrientationPatient is not made of unit vectors")
    if abs(float(np.dot(row_cosine, column_cosine))) > 1e-2:
        raise GeometryError("ImageOrientationPatient row and column are not orthogonal")
    return SliceGeometry(
        position=pos,
        row_cosine=row_cosine / np.linalg.norm(row_cosine),
        column_cosine=column_cosine / np.linalg.norm(column_cosine),
        pixel_spacing=(spacing[0], spacing[1]),
        rows=int(rows),
        columns=int(columns),
    )


def slice_geometry(ds: Dataset) -> SliceGeometry:
    """Read the plane geometry of one classic image; GeometryError if absent."""
    try:
        position = ds.ImagePositionPatient
        orientation = ds.ImageOrientationPatient
        spacing = ds.PixelSpacing
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise GeometryError("image without usable plane geometry (IPP/IOP/PixelSpacing)") from exc
    return plane_geometry(position, orientation, spacing, rows, columns)


def apply_rescale(array: npt.NDArray[np.float32], slope: float, intercept: float) -> npt.NDArray[np.float32]:
    """Stored values through a linear Modality LUT."""
    if slope != 1.0 or intercept != 0.0:
        array = array * np.float32(slope) + np.float32(intercept)
    return array


def rescale_of(item: Dataset) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of ``item``; (1, 0) when absent or empty."""
    try:
        slope = float(item.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        return 1.0, 0.0
    return slope, intercept


def pixel_values(ds: Dataset) -> np.ndarray:
    """Stored pixels of a classic image with the Modality LUT (rescale slope/intercept) applied."""
    try:
        array = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for broken pixel data
        raise UnreadableImage(f"unreadable pixel data: {type(exc).__name__}") from exc
    if array.ndim != 2:
        raise UnreadableImage(f"expected a single-frame image, got pixel array {array.shape}")
    return apply_rescale(array, *rescale_of(ds))


@dataclass(frozen=True, slots=True)
class Stack:
    """The verdict on a set of planes: their order along the normal and the grid.

    ``order[i]`` is the index (in the input) of volume slice ``i``.
    """

    order: tuple[int, ...]
    origin: tuple[float, float, float]
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    slice_cosine: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    def volume(self, voxels: npt.NDArray[np.float32]) -> ImageVolume:
        """The grid carrying ``voxels`` (slices in :attr:`order`)."""
        return ImageVolume(
            voxels=voxels,
            origin=self.origin,
            row_cosine=self.row_cosine,
            column_cosine=self.column_cosine,
            slice_cosine=self.slice_cosine,
            pixel_spacing=self.pixel_spacing,
            slice_spacing=self.slice_spacing,
        )


def _vec(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def check_stack(geometries: Sequence[SliceGeometry], *, what: str = "") -> Stack:
    """Sort planes along their common normal and check they form a regular volume.

    ``what`` prefixes refusal reasons ("DWI: too few slices ...").
    """
    prefix = f"{what}: " if what else ""
    if not geometries:
        raise GeometryError(f"{prefix}no images to stack")
    first = geometries[0]
    for g in geometries[1:]:
        if (
            np.abs(g.row_cosine - first.row_cosine).max() > ORIENTATION_TOLERANCE
            or np.abs(g.column_cosine - first.column_cosine).max() > ORIENTATION_TOLERANCE
        ):
            raise GeometryError(f"{prefix}images of one series have different orientations")
        if (g.rows, g.columns) != (first.rows, first.columns):
            raise GeometryError(f"{prefix}images of one series have different matrix sizes")
        if np.abs(np.subtract(g.pixel_spacing, first.pixel_spacing)).max() > 1e-3:
            raise GeometryError(f"{prefix}images of one series have different pixel spacings")
    normal = first.normal
    distances = np.asarray([float(g.position @ normal) for g in geometries])
    order = np.argsort(distances, kind="stable")
    distances = distances[order]
    if len(order) < MIN_SLICES:
        raise GeometryError(f"{prefix}too few slices ({len(order)} < {MIN_SLICES})")
    gaps = np.diff(distances)
    if np.any(gaps < 1e-3):
        raise GeometryError(f"{prefix}duplicate slice positions (two images at the same location)")
    median_gap = float(np.median(gaps))
    if np.any(np.abs(gaps - median_gap) > SPACING_TOLERANCE * median_gap):
        raise GeometryError(
            f"{prefix}inconsistent slice spacing (missing slices?): gaps from "
            f"{gaps.min():.2f} to {gaps.max():.2f} mm"
        )
    start = geometries[int(order[0])]
    # In-plane offsets between slices must be along the normal (no shear).
    for i, d in zip(order, distances, strict=True):
        expected = start.position + (d - distances[0]) * normal
        if np.abs(geometries[int(i)].position - expected).max() > SHEAR_TOLERANCE_MM:
            raise GeometryError(f"{prefix}slices are not stacked along their normal (sheared volume)")
    # The mean gap over the whole stack is the least-squares spacing of a
    # regular grid through the first and last slice (DS rounding averages out).
    spacing = float((distances[-1] - distances[0]) / (len(distances) - 1))
    return Stack(
        order=tuple(int(i) for i in order),
        origin=_vec(start.position),
        row_cosine=_vec(start.row_cosine),
        column_cosine=_vec(start.column_cosine),
        slice_cosine=_vec(normal),
        pixel_spacing=start.pixel_spacing,
        slice_spacing=spacing,
    )


def sort_along_normal(datasets: Sequence[Dataset]) -> tuple[list[Dataset], np.ndarray]:
    """Sort classic images by their position along the common slice normal.

    Returns the sorted images and their positions along the normal (mm).
    """
    if not datasets:
        raise GeometryError("no images to stack")
    geometries = [slice_geometry(ds) for ds in datasets]
    normal = geometries[0].normal
    distances = np.asarray([float(g.position @ normal) for g in geometries])
    order = np.argsort(distances, kind="stable")
    return [datasets[i] for i in order], distances[order]


def stack_slices(datasets: Sequence[Dataset]) -> tuple[ImageVolume, list[Dataset]]:
    """Build a volume from classic single-frame images of one b-value (or one ADC map).

    Returns the volume and the images in volume slice order.
    """
    stack = check_stack([slice_geometry(ds) for ds in datasets])
    ordered = [datasets[i] for i in stack.order]
    voxels = np.stack([pixel_values(ds) for ds in ordered]).astype(np.float32)
    return stack.volume(voxels), ordered
