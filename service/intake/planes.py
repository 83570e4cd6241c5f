"""Image planes: one 2-D slice of a study, whatever object carried it.

Scanners package slices three ways, and intake must see through all of them:

* a classic MR image is one plane;
* a Siemens MOSAIC image packs all slices of one volume as tiles of one
  large image; each tile is a plane whose position is computed the way
  nibabel (``MosaicWrapper.image_position``) and dcm2niix do: the stored
  ImagePositionPatient is that of the whole mosaic treated as one big image
  centred on the slab, so the first tile sits half the mosaic-minus-tile
  size further along rows and columns; further tiles step by
  SpacingBetweenSlices along the CSA ``SliceNormalVector`` (which also says
  whether tiles ascend or descend);
* an Enhanced MR (or Legacy Converted Enhanced MR) object holds many frames;
  each frame is a plane with its own PlanePosition, orientation, pixel
  measures, pixel value transformation and MR diffusion parameters (per-frame
  functional groups overriding shared ones).

A plane that cannot be understood is kept as role ``other`` with its reason,
so refusals can say what was seen.  Pixel data are decoded lazily, once per
object, and only for planes that end up in a volume.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from service.domain import ImageRole, ImageVolume, SourceFrame
from service.errors import GeometryError, UnreadableImage
from service.imaging import functional_group_item
from service.intake.classify import (
    NO_B_VALUE,
    ImageClass,
    Vendor,
    classify_frame,
    classify_image,
    csa_image_header,
    csa_value,
    csa_vector,
    image_type_tokens,
    private_element_value,
    vendor_of,
    with_role,
)
from service.intake.volume import (
    SliceGeometry,
    apply_rescale,
    check_stack,
    plane_geometry,
    rescale_of,
)

log = logging.getLogger(__name__)

#: Why a UIH VFRAME image is not read (refusal reasons quote it).
UIH_VFRAME = (
    "UIH (uMR) VFRAME image: several slices packed in one image, whose tile layout is not "
    "documented; not supported"
)

#: SOP classes whose frames carry per-frame functional groups we can read.
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True, slots=True)
class Acquisition:
    """What ties images to one acquisition beyond their series: protocol and timing.

    A b0 image can only be combined with a b > 0 image into an ADC when both
    were acquired with the same echo and repetition times: otherwise
    ``-ln(S_b / S_0) / b`` measures T2/T1 contrast, not diffusion (an MPRAGE
    "b0" gave 288 mL instead of 77 mL).  Times are in ms; None when not stated.
    """

    protocol_name: str = ""
    echo_time: float | None = None
    repetition_time: float | None = None

    def mismatch(self, other: Acquisition) -> str:
        """Why ``other`` is not the same acquisition ("" when nothing says so)."""
        if self.protocol_name and other.protocol_name and self.protocol_name != other.protocol_name:
            return f"protocol '{other.protocol_name}' is not '{self.protocol_name}'"
        if self.echo_time is None or other.echo_time is None:
            return "echo time not stated, so it cannot be shown to be the same acquisition"
        if abs(self.echo_time - other.echo_time) > max(1.0, 0.02 * self.echo_time):
            return f"echo time {other.echo_time:g} ms, not {self.echo_time:g} ms"
        if (
            self.repetition_time is not None and other.repetition_time is not None
            and abs(self.repetition_time - other.repetition_time) > 0.05 * self.repetition_time
        ):
            return f"repetition time {other.repetition_time:g} ms, not {self.repetition_time:g} ms"
        return ""


def _milliseconds(item: Dataset | None, keyword: str) -> float | None:
    if item is None:
        return None
    try:
        value = float(item.get(keyword, None))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def acquisition_of(ds: Dataset, frame_index: int | None = None) -> Acquisition:
    """Protocol, echo and repetition time of a classic image or of one Enhanced MR frame."""
    protocol = str(ds.get("ProtocolName", "") or "").strip()
    if frame_index is None:
        return Acquisition(protocol, _milliseconds(ds, "EchoTime"), _milliseconds(ds, "RepetitionTime"))
    echo = _milliseconds(functional_group_item(ds, frame_index, "MREchoSequence"), "EffectiveEchoTime")
    timing = functional_group_item(ds, frame_index, "MRTimingAndRelatedParametersSequence")
    return Acquisition(
        protocol,
        echo if echo is not None else _milliseconds(ds, "EchoTime"),
        _milliseconds(timing, "RepetitionTime") or _milliseconds(ds, "RepetitionTime"),
    )


@dataclass(frozen=True, slots=True)
class RealWorldValue:
    """A Real World Value Mapping (0040,9096) with a unit we understand.

    ``to_micro`` converts the mapped value to 1e-6 mm2/s (the unit of
    :class:`service.domain.DiffusionStudy.adc`).
    """

    slope: float
    intercept: float
    unit: str
    to_micro: float


#: UCUM codes of diffusivity units seen in RealWorldValueMapping, to 1e-6 mm2/s.
DIFFUSIVITY_UNITS: dict[str, float] = {
    "mm2/s": 1e6,
    "mm^2/s": 1e6,
    "m2/s": 1e12,
    "um2/s": 1.0,
    "10-6.mm2/s": 1.0,
    "10*-6.mm2/s": 1.0,
    "10^-6.mm2/s": 1.0,
    "10-3.mm2/s": 1e3,
    "10*-3.mm2/s": 1e3,
    "10^-3.mm2/s": 1e3,
}


def real_world_value(item: Dataset | None) -> RealWorldValue | None:
    """The first linear RealWorldValueMapping item of ``item`` in a diffusivity unit.

    Items with a LUT instead of slope/intercept, or with units we do not know
    (Philips also writes a unitless "display" mapping), are skipped.
    """
    if item is None:
        return None
    for mapping in item.get("RealWorldValueMappingSequence", None) or []:
        units = mapping.get("MeasurementUnitsCodeSequence", None)
        if not units:
            continue
        code = str(units[0].get("CodeValue", "") or "").strip()
        factor = DIFFUSIVITY_UNITS.get(code)
        if factor is None or "RealWorldValueSlope" not in mapping:
            continue
        try:
            slope = float(mapping.RealWorldValueSlope)
            intercept = float(mapping.get("RealWorldValueIntercept", 0.0) or 0.0)
        except (TypeError, ValueError):
            continue
        return RealWorldValue(slope=slope, intercept=intercept, unit=code, to_micro=factor)
    return None


class _PixelCache:
    """Decodes one object's pixel data once, when a plane first needs it."""

    __slots__ = ("_array", "_ds", "_label")

    def __init__(self, ds: Dataset, label: str) -> None:
        self._ds = ds
        self._label = label
        self._array: npt.NDArray[np.float32] | None = None

    def array(self) -> npt.NDArray[np.float32]:
        if self._array is None:
            try:
                self._array = np.asarray(self._ds.pixel_array, dtype=np.float32)
            except Exception as exc:  # pydicom raises many types for broken pixel data
                detail = " ".join(str(exc).split())[:160]
                meta = getattr(self._ds, "file_meta", None)
                syntax = str(meta.get("TransferSyntaxUID", "unknown")) if meta is not None else "unknown"
                raise UnreadableImage(
                    f"unreadable pixel data in {self._label}: {type(exc).__name__}"
                    + (f" ({detail})" if detail else "")
                    + f"; the file is damaged or its transfer syntax {syntax} cannot be decoded: "
                    "resend the study, or remove that instance and resend"
                ) from exc
        return self._array


    def slim(self) -> None:
        """Keep only the Image Pixel module of the object (still encoded), for pickling.

        A Philips header pickles to ~65 kB; the pixel module of a 128x128 image to ~33 kB
        of which almost all is the pixel bytes the parent needs anyway.
        """
        if self._array is not None:
            return
        source = self._ds
        slim = Dataset()
        for keyword in _PIXEL_MODULE:
            if keyword in source:
                slim[keyword] = source[keyword]
        meta = getattr(source, "file_meta", None)
        if meta is not None:
            slim.file_meta = meta
        implicit_vr, little_endian = source.original_encoding
        slim.set_original_encoding(implicit_vr, little_endian)
        self._ds = slim


# What pixel decoding reads (PS3.3 C.7.6.3 Image Pixel module, float pixel data, NumberOfFrames).
_PIXEL_MODULE = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "NumberOfFrames",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
)


def slim_pixel_sources(planes: Sequence[ImagePlane]) -> None:
    """Cut every plane's source object down to its pixel module (see :meth:`_PixelCache.slim`)."""
    seen: set[int] = set()
    for plane in planes:
        if plane.pixels is not None and id(plane.pixels.cache) not in seen:
            seen.add(id(plane.pixels.cache))
            plane.pixels.cache.slim()


@dataclass(frozen=True, slots=True)
class _PixelSlice:
    """How to cut one plane's stored values out of its object's pixel array."""

    cache: _PixelCache
    frame: int | None = None  # index into a multi-frame array
    tile: tuple[int, int, int, int] | None = None  # r0, r1, c0, c1 in a mosaic

    def stored(self, rows: int, columns: int) -> npt.NDArray[np.float32]:
        array = self.cache.array()
        if self.frame is not None:
            if array.ndim == 2 and self.frame == 0:
                plane = array
            elif array.ndim == 3 and self.frame < array.shape[0]:
                plane = array[self.frame]
            else:
                raise UnreadableImage(f"frame {self.frame + 1} missing from pixel data {array.shape}")
        else:
            plane = array
        if self.tile is not None:
            r0, r1, c0, c1 = self.tile
            plane = plane[r0:r1, c0:c1]
        if plane.shape != (rows, columns):
            raise UnreadableImage(
                f"pixel data shape {plane.shape} does not match the image matrix {rows}x{columns}"
            )
        return plane


@dataclass(frozen=True, slots=True, eq=False)
class ImagePlane:
    """One 2-D slice of a study with everything intake needs to place and value it."""

    source: SourceFrame
    cls: ImageClass
    study_instance_uid: str
    series_instance_uid: str
    series_number: int
    frame_of_reference_uid: str
    manufacturer: str
    vendor: Vendor
    geometry: SliceGeometry | None
    geometry_problem: str
    rescale: tuple[float, float]
    real_world: RealWorldValue | None
    pixels: _PixelSlice | None
    acquisition: Acquisition = Acquisition()

    @property
    def role(self) -> ImageRole:
        return self.cls.role

    @property
    def b_value(self) -> float | None:
        return self.cls.b_value

    def require_geometry(self, what: str) -> SliceGeometry:
        if self.geometry is None:
            raise GeometryError(f"{what}: {self.geometry_problem}")
        return self.geometry

    def stored_values(self) -> npt.NDArray[np.float32]:
        """Stored pixel values (before any Modality LUT)."""
        geometry = self.geometry
        if self.pixels is None or geometry is None:
            raise UnreadableImage("image without pixel data")
        return self.pixels.stored(geometry.rows, geometry.columns)

    def values(self) -> npt.NDArray[np.float32]:
        """Pixel values through the Modality LUT (rescale slope/intercept)."""
        return apply_rescale(self.stored_values(), *self.rescale)


def _series_number(ds: Dataset) -> int:
    try:
        return int(ds.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def _label(ds: Dataset, path: Path | None = None) -> str:
    """A log/refusal label for an object: series, instance number and file, never patient identifiers."""
    label = f"series {_series_number(ds)}"
    instance = ds.get("InstanceNumber", None)
    if instance not in (None, ""):
        label += f" instance {instance}"
    if path is not None:
        label += f" (file {path.name})"
    return label


def _common(ds: Dataset) -> dict[str, object]:
    return {
        "study_instance_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "series_number": _series_number(ds),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "") or ""),
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
        "vendor": vendor_of(ds),
    }


def _other(path: Path, ds: Dataset, reason: str, frame_number: int | None = None) -> ImagePlane:
    return ImagePlane(
        source=SourceFrame(
            path=path,
            sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
            sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
            frame_number=frame_number,
        ),
        cls=ImageClass(ImageRole.OTHER, reason=reason),
        geometry=None,
        geometry_problem=reason,
        rescale=(1.0, 0.0),
        real_world=None,
        pixels=None,
        **_common(ds),  # type: ignore[arg-type]
    )


def planes_of(path: Path, ds: Dataset) -> list[ImagePlane]:
    """Every plane of one DICOM object (classic, MOSAIC or multi-frame)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return [_other(path, ds, "no pixel data (not an image)")]
    modality = str(ds.get("Modality", "") or "").upper()
    if modality and modality != "MR":
        return [_other(path, ds, f"not an MR image (modality {modality})")]
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return _multiframe_planes(path, ds)
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    if n_frames > 1:
        return [_other(path, ds, "multi-frame image without functional groups")]
    if vendor_of(ds) is Vendor.UIH and "VFRAME" in image_type_tokens(ds.get("ImageType", None)):
        return [_other(path, ds, UIH_VFRAME)]
    # A MOSAIC says so in ImageType (as dcm2niix relies on); a count in the
    # CSA header alone does not make one (non-mosaic images may carry it).
    if "MOSAIC" in image_type_tokens(ds.get("ImageType", None)):
        csa = csa_image_header(ds)
        return _mosaic_planes(path, ds, csa, _mosaic_count(ds, csa))
    return [_classic_plane(path, ds)]


def _classic_plane(path: Path, ds: Dataset) -> ImagePlane:
    cls = classify_image(ds)
    geometry: SliceGeometry | None = None
    problem = ""
    try:
        geometry = plane_geometry(
            ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing,
            int(ds.Rows), int(ds.Columns),
        )
    except (AttributeError, TypeError, ValueError, GeometryError) as exc:
        problem = getattr(exc, "reason", "image without usable plane geometry (IPP/IOP/PixelSpacing)")
    return ImagePlane(
        source=SourceFrame(
            path=path,
            sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
            sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
        ),
        cls=cls,
        geometry=geometry,
        geometry_problem=problem,
        rescale=rescale_of(ds),
        real_world=real_world_value(ds),
        pixels=_PixelSlice(_PixelCache(ds, _label(ds, path))),
        acquisition=acquisition_of(ds),
        **_common(ds),  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------
# Siemens MOSAIC


def _mosaic_count(ds: Dataset, csa: dict[str, object] | None) -> int | None:
    """NumberOfImagesInMosaic from the CSA header, else (0019,xx0A); None if absent or 0."""
    for value in (
        csa_value(csa, "NumberOfImagesInMosaic"),
        private_element_value(ds, 0x0019, "SIEMENS MR HEADER", 0x0A),
    ):
        if value is None:
            continue
        if isinstance(value, bytes) and len(value) == 2:
            value = int.from_bytes(value, "little")
        try:
            count = int(float(value))
        except (TypeError, ValueError):
            continue
        if count > 0:
            return count
    return None


def _mosaic_planes(
    path: Path, ds: Dataset, csa: dict[str, object] | None, count: int | None
) -> list[ImagePlane]:
    label = _label(ds, path)
    if count is None:
        return [_other(path, ds, "MOSAIC image without NumberOfImagesInMosaic (CSA or (0019,xx0A))")]
    rows, columns = int(ds.Rows), int(ds.Columns)
    grid = math.ceil(math.sqrt(count))
    if rows % grid or columns % grid:
        return [_other(path, ds, f"MOSAIC matrix {rows}x{columns} is not a {grid}x{grid} grid of tiles")]
    tile_rows, tile_columns = rows // grid, columns // grid
    cls = classify_image(ds)
    geometries: list[SliceGeometry | None]
    problem = ""
    try:
        geometries = list(_mosaic_geometries(ds, csa, count, grid, tile_rows, tile_columns))
    except GeometryError as exc:
        geometries = [None] * count
        problem = exc.reason
        log.warning("%s: MOSAIC geometry unusable: %s", label, problem)
    cache = _PixelCache(ds, label)
    rescale = rescale_of(ds)
    rwv = real_world_value(ds)
    acquisition = acquisition_of(ds)
    planes = []
    for k in range(count):
        r, c = divmod(k, grid)
        planes.append(
            ImagePlane(
                source=SourceFrame(
                    path=path,
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
                    sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
                    mosaic_index=k,
                ),
                cls=cls,
                geometry=geometries[k],
                geometry_problem=problem,
                rescale=rescale,
                real_world=rwv,
                pixels=_PixelSlice(
                    cache,
                    tile=(r * tile_rows, (r + 1) * tile_rows, c * tile_columns, (c + 1) * tile_columns),
                ),
                acquisition=acquisition,
                **_common(ds),  # type: ignore[arg-type]
            )
        )
    return planes


def _mosaic_geometries(
    ds: Dataset,
    csa: dict[str, object] | None,
    count: int,
    grid: int,
    tile_rows: int,
    tile_columns: int,
) -> list[SliceGeometry]:
    """Per-tile geometry of a MOSAIC (see the module docstring)."""
    try:
        mosaic = plane_geometry(
            ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing,
            int(ds.Rows), int(ds.Columns),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise GeometryError("MOSAIC without usable plane geometry (IPP/IOP/PixelSpacing)") from exc
    normal = csa_vector(csa, "SliceNormalVector", 3)
    if normal is None or float(np.linalg.norm(normal)) < 1e-6:
        raise GeometryError("MOSAIC without CSA SliceNormalVector: order of its tiles unknown")
    normal = normal / np.linalg.norm(normal)
    if abs(float(normal @ mosaic.normal)) < 0.99:
        raise GeometryError("MOSAIC SliceNormalVector is not normal to ImageOrientationPatient")
    try:
        spacing = float(ds.get("SpacingBetweenSlices", 0) or 0)
    except (TypeError, ValueError):
        spacing = 0.0
    if count > 1 and spacing <= 0:
        raise GeometryError(
            "MOSAIC without SpacingBetweenSlices: slice spacing cannot be resolved"
        )
    # IPP of a mosaic is that of a mosaic-sized image centred on the slab:
    # move to the first tile's top-left pixel.
    shift_rows = (ds.Rows - tile_rows) / 2.0
    shift_columns = (ds.Columns - tile_columns) / 2.0
    first = (
        mosaic.position
        + shift_rows * mosaic.pixel_spacing[0] * mosaic.column_cosine
        + shift_columns * mosaic.pixel_spacing[1] * mosaic.row_cosine
    )
    return [
        SliceGeometry(
            position=first + k * spacing * normal,
            row_cosine=mosaic.row_cosine,
            column_cosine=mosaic.column_cosine,
            pixel_spacing=mosaic.pixel_spacing,
            rows=tile_rows,
            columns=tile_columns,
        )
        for k in range(count)
    ]


# --------------------------------------------------------------------------
# Enhanced MR multi-frame


def _multiframe_planes(path: Path, ds: Dataset) -> list[ImagePlane]:
    label = _label(ds, path)
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return [_other(path, ds, "multi-frame object without NumberOfFrames/Rows/Columns")]
    cache = _PixelCache(ds, label)
    planes = []
    for i in range(n_frames):
        cls = classify_frame(ds, i)
        geometry: SliceGeometry | None = None
        problem = ""
        position = functional_group_item(ds, i, "PlanePositionSequence")
        orientation = functional_group_item(ds, i, "PlaneOrientationSequence")
        measures = functional_group_item(ds, i, "PixelMeasuresSequence")
        try:
            if position is None or orientation is None or measures is None:
                raise GeometryError(
                    f"frame {i + 1} lacks PlanePosition/PlaneOrientation/PixelMeasures"
                )
            geometry = plane_geometry(
                position.ImagePositionPatient, orientation.ImageOrientationPatient,
                measures.PixelSpacing, rows, columns,
            )
        except (AttributeError, TypeError, ValueError) as exc:
            problem = f"frame {i + 1} without usable plane geometry ({type(exc).__name__})"
        except GeometryError as exc:
            problem = exc.reason
        transformation = functional_group_item(ds, i, "PixelValueTransformationSequence")
        rescale = rescale_of(transformation) if transformation is not None else rescale_of(ds)
        rwv = real_world_value(_rwvm_holder(ds, i)) or real_world_value(ds)
        planes.append(
            ImagePlane(
                source=SourceFrame(
                    path=path,
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
                    sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
                    frame_number=i + 1,
                ),
                cls=cls,
                geometry=geometry,
                geometry_problem=problem,
                rescale=rescale,
                real_world=rwv,
                pixels=_PixelSlice(cache, frame=i),
                acquisition=acquisition_of(ds, i),
                **_common(ds),  # type: ignore[arg-type]
            )
        )
    return planes


def _rwvm_holder(ds: Dataset, frame_index: int) -> Dataset | None:
    """The functional group item (per-frame, else shared) that holds RealWorldValueMappingSequence.

    In functional groups the mapping sequence sits directly in the group
    item, not nested in a macro sequence of its own.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and frame_index < len(per_frame):
        item: Dataset = per_frame[frame_index]
        if "RealWorldValueMappingSequence" in item:
            return item
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    if shared and "RealWorldValueMappingSequence" in shared[0]:
        shared_item: Dataset = shared[0]
        return shared_item
    return None


# --------------------------------------------------------------------------
# Series-level conventions


def _position_key(geometry: SliceGeometry) -> tuple[float, float, float]:
    return tuple(round(float(v), 1) for v in geometry.position)  # type: ignore[return-value]


def resolve_series_conventions(planes: Sequence[ImagePlane]) -> list[ImagePlane]:
    """Apply conventions that only a whole series reveals.

    Canon/Toshiba write the b-value only on b > 0 images: within a series in
    which b > 0 images (trace, or directional as in DTI) carry a b-value, the
    images without any b-value at exactly the positions of the b > 0 images
    (the same number at every position: one b0, or several averages, per
    slice; nothing derived) are the b0.  Nothing else is inferred from context.
    """
    by_series: dict[str, list[int]] = defaultdict(list)
    for i, plane in enumerate(planes):
        by_series[plane.series_instance_uid].append(i)
    resolved = list(planes)
    weighted_roles = (ImageRole.DWI, ImageRole.DIRECTIONAL)
    for indices in by_series.values():
        series = [planes[i] for i in indices]
        if series[0].vendor is not Vendor.CANON:
            continue
        weighted = [p for p in series if p.role in weighted_roles and p.geometry is not None]
        unlabelled = [
            i for i in indices
            if planes[i].role is ImageRole.OTHER and planes[i].cls.reason == NO_B_VALUE
            and planes[i].geometry is not None
        ]
        if not weighted or not unlabelled:
            continue
        weighted_positions = {_position_key(p.geometry) for p in weighted if p.geometry is not None}
        keys = [_position_key(planes[i].geometry) for i in unlabelled]  # type: ignore[arg-type]
        per_position = {keys.count(k) for k in set(keys)}
        if len(per_position) != 1 or not set(keys) <= weighted_positions:
            log.info(
                "series %d: %d Canon images without b-value do not match the b>0 positions; "
                "not taken as b0", series[0].series_number, len(unlabelled),
            )
            continue
        for i in unlabelled:
            resolved[i] = replace(
                planes[i],
                cls=with_role(
                    planes[i].cls, ImageRole.B0, b_value=0.0,
                    source="Canon convention: no b-value beside b>0 images of the series",
                ),
            )
    return resolved


# --------------------------------------------------------------------------
# Volumes


def stack_planes(planes: Sequence[ImagePlane], *, what: str) -> tuple[ImageVolume, list[ImagePlane]]:
    """Stack planes of one b-value (or one ADC map) into a volume of Modality-LUT values.

    Returns the volume and the planes in volume slice order.
    """
    stack = check_stack([p.require_geometry(what) for p in planes], what=what)
    ordered = [planes[i] for i in stack.order]
    voxels = np.stack([p.values() for p in ordered]).astype(np.float32)
    return stack.volume(voxels), ordered
