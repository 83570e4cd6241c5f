"""Which DICOM object, and which part of it, each mask slice lies on.

The mask we encode has one slice per DWI slice, and scanners package those
slices three ways (see :mod:`service.intake.planes`):

* **classic**: one single-frame MR image per slice.  The SEG, SR and overlay
  reference each image; highdicom derives the SEG's geometry from them.
* **multi-frame** (Enhanced MR, Legacy Converted Enhanced MR): one object
  holds many frames -- for DWI typically b0 *and* b-high frames at the same
  plane positions.  A slice is one frame: references carry its
  ReferencedFrameNumber.  highdicom 0.28 cannot build a SEG from such an
  object on its own (duplicate plane positions), so :mod:`service.derive.seg`
  gives it the high-b frames' positions and writes the per-frame references.
* **MOSAIC** (Siemens): one single-frame image holds all slices as tiles.  No
  DICOM reference can address a tile, so the derived objects reference the
  mosaic image as a whole and carry their own geometry (from the DWI volume
  that intake reconstructed: ``origin + k * slice_spacing * slice_cosine``).

:class:`SliceSources` holds one :class:`SliceReference` per mask slice plus,
for multi-frame and MOSAIC sources, the slice grid; the SEG, SR and overlay
builders take it wherever they take a list of classic source headers.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from service.derive.findings import GridGeometry
from service.domain import ImageVolume, SourceFrame

__all__ = [
    "SliceReference",
    "SliceSources",
    "SourceLayout",
    "as_slice_sources",
    "functional_group_item",
]

#: A frame must lie within this fraction of the slice spacing of its slice.
_SLICE_TOLERANCE = 0.5
#: ... and within this many pixels of the slice's in-plane origin.
_IN_PLANE_TOLERANCE_PIXELS = 1.0
#: Orientation cosines and pixel spacings must agree with the grid this closely.
_COSINE_TOLERANCE = 1e-3
_SPACING_RTOL = 1e-3


class SourceLayout(enum.StrEnum):
    """How the source objects hold the slices (see the module docstring)."""

    CLASSIC = "classic"
    MULTIFRAME = "multiframe"
    MOSAIC = "mosaic"


@dataclass(frozen=True, slots=True, eq=False)
class SliceReference:
    """The source of one mask slice: an object (header), and the frame or tile in it."""

    dataset: Dataset
    frame_number: int | None = None  # 1-based, multi-frame objects
    mosaic_index: int | None = None  # 0-based tile, Siemens MOSAIC

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def functional_group_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` for frame ``frame_index`` (0-based).

    Per-frame functional groups override shared ones; None if neither has it.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and frame_index < len(per_frame):
        item = per_frame[frame_index]
        if sequence in item and len(item[sequence].value) > 0:
            return item[sequence].value[0]  # type: ignore[no-any-return]
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    if shared and sequence in shared[0] and len(shared[0][sequence].value) > 0:
        return shared[0][sequence].value[0]  # type: ignore[no-any-return]
    return None


def _floats(values: object, n: int, what: str) -> npt.NDArray[np.float64]:
    try:
        array = np.array([float(v) for v in values], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not numeric") from exc
    if array.shape != (n,) or not np.isfinite(array).all():
        raise ValueError(f"{what} must be {n} finite numbers")
    return array


def _number_of_frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True, slots=True, eq=False)
class SliceSources:
    """The source of every mask slice: ``references[i]`` is where slice ``i`` lies.

    ``geometry`` (the slice grid in patient coordinates) and ``frame_shape``
    (rows, columns of a slice) are set for multi-frame and MOSAIC sources,
    whose objects cannot describe a slice by their top-level attributes;
    classic sources describe themselves and may leave them unset.

    Build with :meth:`from_datasets` (classic headers, one per slice) or
    :meth:`from_frames` (the pipeline's :class:`service.domain.SourceFrame`
    list and DWI volume), which check that every frame lies on its slice.
    """

    references: tuple[SliceReference, ...]
    layout: SourceLayout
    geometry: GridGeometry | None = None
    frame_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.references) == 0:
            raise ValueError("at least one source image is required")
        if self.layout is not SourceLayout.CLASSIC and (
            self.geometry is None or self.frame_shape is None
        ):
            raise ValueError(f"{self.layout.value} sources need the slice grid and frame shape")
        if self.geometry is not None and len(self.geometry.slice_origins) != len(self.references):
            raise ValueError("the slice grid and the references must have one entry per slice")

    # ------------------------------------------------------------ construction

    @classmethod
    def from_datasets(cls, datasets: Sequence[Dataset]) -> SliceSources:
        """Classic sources: ``datasets[i]`` is the image of slice ``i`` (not checked here)."""
        return cls(tuple(SliceReference(ds) for ds in datasets), SourceLayout.CLASSIC)

    @classmethod
    def from_frames(
        cls,
        frames: Sequence[SourceFrame],
        headers: Mapping[str, Dataset],
        dwi: ImageVolume | None,
    ) -> SliceSources:
        """Sources of the DWI slices as intake found them.

        ``frames[i]`` is :attr:`service.domain.DiffusionStudy.dwi_sources`
        ``[i]``, ``headers`` maps each SOP Instance UID to that object's header
        (``stop_before_pixels=True`` is enough) and ``dwi`` is the DWI volume
        (required unless every slice is a classic image).

        Raises
        ------
        ValueError
            If the frames mix layouts, a header is missing or disagrees, a
            frame number or tile index is out of range or used twice, or a
            frame does not lie on its slice of ``dwi``.
        """
        if len(frames) == 0:
            raise ValueError("at least one source frame is required")
        layouts = set()
        for i, frame in enumerate(frames):
            if frame.frame_number is not None and frame.mosaic_index is not None:
                raise ValueError(f"source frame {i} is both a frame and a MOSAIC tile")
            layouts.add(
                SourceLayout.MOSAIC
                if frame.mosaic_index is not None
                else SourceLayout.MULTIFRAME
                if frame.frame_number is not None
                else SourceLayout.CLASSIC
            )
        if len(layouts) > 1:
            raise ValueError(
                "source frames mix layouts (" + ", ".join(sorted(v.value for v in layouts)) + ")"
            )
        layout = layouts.pop()

        references = []
        for i, frame in enumerate(frames):
            ds = headers.get(frame.sop_instance_uid)
            if ds is None:
                raise ValueError(f"no header for the object of source frame {i}")
            if (
                str(ds.get("SOPInstanceUID", "")) != frame.sop_instance_uid
                or str(ds.get("SOPClassUID", "")) != frame.sop_class_uid
            ):
                raise ValueError(f"the header of source frame {i} is another object")
            references.append(SliceReference(ds, frame.frame_number, frame.mosaic_index))

        if dwi is not None and dwi.shape[0] != len(frames):
            raise ValueError(
                f"dwi has {dwi.shape[0]} slices but {len(frames)} source frames were given"
            )
        if layout is SourceLayout.CLASSIC:
            if dwi is None:
                return cls(tuple(references), layout)
            return cls(
                tuple(references),
                layout,
                GridGeometry.from_volume(dwi),
                (dwi.shape[1], dwi.shape[2]),
            )
        if dwi is None:
            raise ValueError(
                f"{layout.value} sources need the DWI volume (dwi=) for the slice geometry"
            )
        sources = cls(
            tuple(references), layout, GridGeometry.from_volume(dwi), (dwi.shape[1], dwi.shape[2])
        )
        sources._check_objects()
        if layout is SourceLayout.MULTIFRAME:
            sources._check_frames()
        else:
            sources._check_tiles()
        return sources

    def _check_objects(self) -> None:
        objects = self.objects
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
            values = {str(ds.get(keyword, "") or "") for ds in objects}
            if "" in values:
                raise ValueError(f"a source object lacks {keyword}")
            if len(values) > 1:
                raise ValueError(f"source objects must share one {keyword}")

    def _check_frames(self) -> None:
        geometry, (rows, columns) = self._grid()
        seen: set[tuple[str, int]] = set()
        normal = np.cross(geometry.row_cosine, geometry.column_cosine)
        for i, ref in enumerate(self.references):
            assert ref.frame_number is not None
            ds = ref.dataset
            key = (ref.sop_instance_uid, ref.frame_number)
            if key in seen:
                raise ValueError(f"frame {ref.frame_number} is the source of two slices")
            seen.add(key)
            if not 1 <= ref.frame_number <= _number_of_frames(ds):
                raise ValueError(
                    f"slice {i}: frame {ref.frame_number} is not in an object of "
                    f"{_number_of_frames(ds)} frames"
                )
            if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
                raise ValueError(
                    f"mask slices are {rows}x{columns} but the source frames are "
                    f"{int(ds.Rows)}x{int(ds.Columns)}"
                )
            position = self.frame_position(i)
            orientation = functional_group_item(
                ds, ref.frame_number - 1, "PlaneOrientationSequence"
            )
            measures = functional_group_item(ds, ref.frame_number - 1, "PixelMeasuresSequence")
            if orientation is None or measures is None:
                raise ValueError(f"frame {ref.frame_number} lacks PlaneOrientation/PixelMeasures")
            self._check_plane(
                f"frame {ref.frame_number}",
                _floats(orientation.get("ImageOrientationPatient"), 6, "ImageOrientationPatient"),
                _floats(measures.get("PixelSpacing"), 2, "PixelSpacing"),
            )
            offset = position - geometry.slice_origins[i]
            along = float(offset @ normal)
            in_plane = float(np.linalg.norm(offset - along * normal))
            if abs(along) > _SLICE_TOLERANCE * geometry.slice_spacing or in_plane > (
                _IN_PLANE_TOLERANCE_PIXELS * max(geometry.pixel_spacing)
            ):
                raise ValueError(
                    f"frame {ref.frame_number} does not lie on slice {i} of the DWI volume "
                    f"({along:.2f} mm off the slice, {in_plane:.2f} mm in-plane)"
                )

    def _check_tiles(self) -> None:
        _, (rows, columns) = self._grid()
        seen: set[tuple[str, int]] = set()
        for i, ref in enumerate(self.references):
            assert ref.mosaic_index is not None
            ds = ref.dataset
            key = (ref.sop_instance_uid, ref.mosaic_index)
            if key in seen:
                raise ValueError(f"MOSAIC tile {ref.mosaic_index} is the source of two slices")
            seen.add(key)
            if _number_of_frames(ds) > 1:
                raise ValueError(f"slice {i}: a MOSAIC must be a single-frame image")
            total_rows, total_columns = int(ds.Rows), int(ds.Columns)
            if total_rows % rows or total_columns % columns:
                raise ValueError(
                    f"a {total_rows}x{total_columns} MOSAIC cannot hold {rows}x{columns} tiles"
                )
            if not 0 <= ref.mosaic_index < (total_rows // rows) * (total_columns // columns):
                raise ValueError(f"slice {i}: MOSAIC tile {ref.mosaic_index} does not exist")
            self._check_plane(
                "the MOSAIC",
                _floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient"),
                _floats(ds.get("PixelSpacing"), 2, "PixelSpacing"),
            )

    def _check_plane(
        self, what: str, orientation: npt.NDArray[np.float64], spacing: npt.NDArray[np.float64]
    ) -> None:
        geometry, _ = self._grid()
        if not np.allclose(
            orientation,
            [*geometry.row_cosine, *geometry.column_cosine],
            atol=_COSINE_TOLERANCE,
        ):
            raise ValueError(f"{what} is not oriented like the DWI volume")
        if not np.allclose(spacing, geometry.pixel_spacing, rtol=_SPACING_RTOL):
            raise ValueError(f"{what} has another PixelSpacing than the DWI volume")

    def _grid(self) -> tuple[GridGeometry, tuple[int, int]]:
        if self.geometry is None or self.frame_shape is None:
            raise ValueError("these sources carry no slice grid")
        return self.geometry, self.frame_shape

    # ----------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self.references)

    @property
    def objects(self) -> list[Dataset]:
        """The distinct source objects, in order of first use."""
        seen: dict[str, Dataset] = {}
        for ref in self.references:
            seen.setdefault(ref.sop_instance_uid, ref.dataset)
        return list(seen.values())

    @property
    def first(self) -> Dataset:
        """The object of slice 0 (it supplies the patient/study header)."""
        return self.references[0].dataset

    def instance_number(self, i: int) -> int | None:
        """InstanceNumber of slice ``i``'s image; None for frames and tiles (not per slice)."""
        if self.layout is not SourceLayout.CLASSIC:
            return None
        try:
            return int(self.references[i].dataset.InstanceNumber)
        except (AttributeError, TypeError, ValueError):
            return None

    def frame_position(self, i: int) -> npt.NDArray[np.float64]:
        """ImagePositionPatient of slice ``i`` as the source states it.

        A classic image's or a frame's own position; for a MOSAIC tile (whose
        position no attribute states) the slice grid's.
        """
        ref = self.references[i]
        if ref.frame_number is not None:
            item = functional_group_item(ref.dataset, ref.frame_number - 1, "PlanePositionSequence")
            if item is None:
                raise ValueError(f"frame {ref.frame_number} lacks a PlanePositionSequence")
            return _floats(item.get("ImagePositionPatient"), 3, "ImagePositionPatient")
        if ref.mosaic_index is not None:
            geometry, _ = self._grid()
            return np.asarray(geometry.slice_origins[i], dtype=np.float64)
        return _floats(ref.dataset.get("ImagePositionPatient"), 3, "ImagePositionPatient")

    def sr_source_images(
        self, start: int = 0, stop: int | None = None
    ) -> list[hd.sr.SourceImageForSegmentation]:
        """SR IMAGE references for slices ``start:stop``: one per object, with its frames.

        Classic images and MOSAICs are referenced whole; a multi-frame object
        once with the (ascending) frame numbers of the slices.
        """
        frames: dict[str, list[int]] = {}
        classes: dict[str, str] = {}
        for ref in self.references[start:stop]:
            uid = ref.sop_instance_uid
            classes[uid] = ref.sop_class_uid
            numbers = frames.setdefault(uid, [])
            if ref.frame_number is not None:
                numbers.append(ref.frame_number)
        return [
            hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=classes[uid],
                referenced_sop_instance_uid=uid,
                referenced_frame_numbers=sorted(set(numbers)) or None,
            )
            for uid, numbers in frames.items()
        ]

    def display_order(self) -> list[int] | None:
        """Slice indices in the order the scanner stored them (frame / tile order).

        None for classic sources (ordered by InstanceNumber elsewhere).
        """
        if self.layout is SourceLayout.CLASSIC:
            return None
        uid_rank = {ds.SOPInstanceUID: k for k, ds in enumerate(self.objects)}

        def key(i: int) -> tuple[int, int]:
            ref = self.references[i]
            within = ref.frame_number if ref.frame_number is not None else ref.mosaic_index
            return (uid_rank[ref.dataset.SOPInstanceUID], int(within or 0))

        return sorted(range(len(self.references)), key=key)

    def slice_key(self, i: int) -> str:
        """A string naming slice ``i``'s source uniquely (for derived UIDs)."""
        ref = self.references[i]
        if ref.frame_number is not None:
            return f"{ref.sop_instance_uid}/frame/{ref.frame_number}"
        if ref.mosaic_index is not None:
            return f"{ref.sop_instance_uid}/tile/{ref.mosaic_index}"
        return ref.sop_instance_uid


def as_slice_sources(source_images: Sequence[Dataset] | SliceSources) -> SliceSources:
    """``source_images`` as :class:`SliceSources` (a list is taken as classic images)."""
    if isinstance(source_images, SliceSources):
        return source_images
    return SliceSources.from_datasets(list(source_images))


def positive_number(value: object) -> float | None:
    """``value`` as a positive finite float, else None."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 and math.isfinite(number) else None
