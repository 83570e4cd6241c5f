"""Head pose in the scanner and the axial EPI scan grid of a phantom.

Coordinates: MNI space is RAS millimetres; DICOM patient space is LPS
millimetres.  The head is the MNI head after a random similarity transform
(pose): ``p = scale * R @ F @ x_ras + t`` with ``F = diag(-1, -1, 1)``.

The scan grid follows the DICOM slice convention used throughout strokeseg:
slice ``k`` is centred at ``origin + k * slice_spacing * n`` with
``n = cross(row_cosine, column_cosine)``, so index order is ascending
``dot(IPP, n)``; pixel (r, c) of a slice is at
``IPP + c * pixel_spacing[1] * row_cosine + r * pixel_spacing[0] * column_cosine``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.domain import ImageVolume, Vector3

logger = logging.getLogger(__name__)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

MATRIX_CHOICES: tuple[int, ...] = (128, 160, 192, 256)
#: Default protocol draws (field of view mm, slice thickness mm, slice count).
FOV_CHOICES: tuple[float, ...] = (220.0, 230.0, 240.0)
THICKNESS_CHOICES: tuple[float, ...] = (4.0, 4.5, 5.0)
SLICE_COUNT_RANGE: tuple[int, int] = (22, 30)


def _ds_round(value: float) -> float:
    """The value as it survives a DICOM DS string (see :func:`format_ds`)."""
    return float(format_ds(value))


def format_ds(value: float) -> str:
    """Format a float for a DS element (at most 16 characters)."""
    if abs(value) < 1e-9:
        return "0"
    text = format(value, ".10g")
    precision = 10
    while len(text) > 16 and precision > 1:
        precision -= 1
        text = format(value, f".{precision}g")
    return text


@dataclass(frozen=True, slots=True)
class Pose:
    """Similarity transform from MNI RAS mm to patient LPS mm."""

    rotation: tuple[tuple[float, float, float], ...]
    translation: Vector3
    scale: float

    def matrix(self) -> npt.NDArray[np.float64]:
        """4x4 homogeneous transform MNI RAS -> patient LPS."""
        m = np.eye(4)
        m[:3, :3] = self.scale * np.asarray(self.rotation) @ LPS_FROM_RAS
        m[:3, 3] = self.translation
        return m


@dataclass(frozen=True, slots=True)
class ScanGeometry:
    """The DWI/ADC grid of one phantom, exactly as written to DICOM.

    Values are already rounded to what the DS strings hold, so geometry read
    back from the files equals this (to DS precision).
    """

    shape: tuple[int, int, int]  # (slices, rows, columns)
    origin: Vector3
    row_cosine: Vector3
    column_cosine: Vector3
    slice_cosine: Vector3
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slice_spacing: float
    slice_thickness: float

    @property
    def voxel_volume_ml(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing / 1000.0

    def position(self, k: int) -> Vector3:
        """ImagePositionPatient of slice ``k`` (rounded as written)."""
        p = np.asarray(self.origin) + k * self.slice_spacing * np.asarray(self.slice_cosine)
        return (_ds_round(p[0]), _ds_round(p[1]), _ds_round(p[2]))

    def index_to_patient(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping (slice, row, column, 1) indices to patient LPS mm."""
        m = np.eye(4)
        m[:3, 0] = np.asarray(self.slice_cosine) * self.slice_spacing
        m[:3, 1] = np.asarray(self.column_cosine) * self.pixel_spacing[0]
        m[:3, 2] = np.asarray(self.row_cosine) * self.pixel_spacing[1]
        m[:3, 3] = self.origin
        return m

    def image_volume(self, voxels: npt.NDArray[np.float32]) -> ImageVolume:
        """This grid as a :class:`service.domain.ImageVolume` carrying ``voxels``."""
        return ImageVolume(
            voxels=np.asarray(voxels, dtype=np.float32),
            origin=self.origin,
            row_cosine=self.row_cosine,
            column_cosine=self.column_cosine,
            slice_cosine=self.slice_cosine,
            pixel_spacing=self.pixel_spacing,
            slice_spacing=self.slice_spacing,
        )


def _rotation_xyz(angles_rad: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return np.asarray(rz @ ry @ rx)


def random_pose(rng: np.random.Generator) -> Pose:
    """Head pose: +-12 deg about each axis, +-10 mm shift, scale 0.92-1.08."""
    rotation = _rotation_xyz(np.deg2rad(rng.uniform(-12.0, 12.0, size=3)))
    translation = rng.uniform(-10.0, 10.0, size=3)
    scale = float(rng.uniform(0.92, 1.08))
    return Pose(
        rotation=tuple((float(row[0]), float(row[1]), float(row[2])) for row in rotation),
        translation=(float(translation[0]), float(translation[1]), float(translation[2])),
        scale=scale,
    )


def random_scan_geometry(
    rng: np.random.Generator,
    pose: Pose,
    brain_points_ras: npt.NDArray[np.float64],
    *,
    matrix: int | None = None,
    matrix_choices: Sequence[int] = MATRIX_CHOICES,
    fov_choices: Sequence[float] = FOV_CHOICES,
    thickness_choices: Sequence[float] = THICKNESS_CHOICES,
    gap_choices: Sequence[float] | None = None,
    slice_count_range: tuple[int, int] = SLICE_COUNT_RANGE,
) -> ScanGeometry:
    """An axial (possibly slightly oblique) slab covering the brain and cerebellum.

    The keyword choices describe a scanner protocol (see
    :mod:`models.synth.domains`); their defaults are the mixed-protocol
    phantom.  Without ``gap_choices`` the slice spacing is one of 5.0, 5.5 or
    6.0 mm leaving at least a 0.5 mm gap (the default draws, kept bit for bit);
    with it, spacing = thickness + gap.
    """
    n_matrix = int(matrix if matrix is not None else rng.choice(matrix_choices))
    fov = float(rng.choice(list(fov_choices)))
    pixel = _ds_round(fov / n_matrix)
    thickness = float(rng.choice(list(thickness_choices)))
    if gap_choices is None:
        spacing = float(rng.choice([s for s in (5.0, 5.5, 6.0) if s >= thickness + 0.5]))
    else:
        spacing = _ds_round(thickness + float(rng.choice(list(gap_choices))))

    # Axial slices, tilted a little about L-R (AC-PC-like) and A-P half of the time.
    tilt = np.zeros(3)
    if rng.random() < 0.5:
        tilt = np.deg2rad(np.array([rng.uniform(-15.0, 15.0), rng.uniform(-5.0, 5.0), 0.0]))
    rot = _rotation_xyz(tilt)
    row = rot @ np.array([1.0, 0.0, 0.0])
    col = rot @ np.array([0.0, 1.0, 0.0])
    row = np.array([_ds_round(v) for v in row])
    col = np.array([_ds_round(v) for v in col])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)

    pts = brain_points_ras @ pose.matrix()[:3, :3].T + pose.matrix()[:3, 3]
    along = pts @ normal
    lo, hi = float(along.min()), float(along.max())
    needed = int(math.ceil((hi - lo) / spacing)) + 1
    n_slices = int(np.clip(needed + int(rng.integers(0, 3)), *slice_count_range))
    coverage = (n_slices - 1) * spacing
    if coverage >= hi - lo:
        first = lo - (coverage - (hi - lo)) * float(rng.uniform(0.3, 0.7))
    else:  # not enough slices: keep the cerebellum, lose a little vertex
        first = lo + 1.0
    centre = pts.mean(axis=0)
    centre_in_plane = centre - (centre @ normal) * normal
    centre_in_plane += (rng.uniform(-5.0, 5.0) * row) + (rng.uniform(-5.0, 5.0) * col)
    origin = (
        centre_in_plane
        + first * normal
        - (n_matrix - 1) / 2.0 * pixel * row
        - (n_matrix - 1) / 2.0 * pixel * col
    )
    return ScanGeometry(
        shape=(n_slices, n_matrix, n_matrix),
        origin=(_ds_round(origin[0]), _ds_round(origin[1]), _ds_round(origin[2])),
        row_cosine=(float(row[0]), float(row[1]), float(row[2])),
        column_cosine=(float(col[0]), float(col[1]), float(col[2])),
        slice_cosine=(float(normal[0]), float(normal[1]), float(normal[2])),
        pixel_spacing=(pixel, pixel),
        slice_spacing=spacing,
        slice_thickness=thickness,
    )
