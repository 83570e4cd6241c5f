"""The lesion outlined in colour over the DWI, as Secondary Capture images.

Why: many PACS viewers (and every phone and web viewer a stroke team uses at
3 am) do not render DICOM SEG; an RGB Secondary Capture series is shown by
all of them.  It is a picture for orientation, not the result of record:
the SEG and SR carry the numbers, and the overlay says so in burned-in text.

Design choices, and why:

* **Classic SC Image Storage** (``hd.sc.SCImage``), one RGB image per DWI
  slice, in a new series of the source study.  Multi-frame True Color SC
  would be one object, but classic SC is what the oldest viewers and
  routers accept; one image per slice also scrolls like the source series.
  Images are numbered in the source series' InstanceNumber order (spatial
  order when that is missing or ambiguous), so they scroll the same way.
* **Windowing**: one window for the whole series (so brightness does not
  jump between slices): the caller's ``window`` or, by default, the 0.5th
  to 99.5th percentile of the finite DWI values.
* **Upscaling** by an integer factor (nearest neighbour) to at least
  ``min_size`` pixels: DWI matrices are small (96-256), and at native size
  both a 1-pixel outline and legible text would cover anatomy.  At 4x the
  outline covers a quarter of a boundary voxel and the DWI signal under it
  stays visible.  PixelSpacing is scaled accordingly.
* **Outline**: the pixels of the upscaled mask that have a 4-neighbour
  outside it (the image edge counts as outside), painted ``outline_rgb``
  (not grey, so it cannot be mistaken for signal).  Every other image pixel
  is the windowed DWI grey value, untouched.
* **Text** goes in a black banner *below* the image, never over anatomy:
  for a result outside the model's validated range first a warning
  "OUTSIDE VALIDATED RANGE: <first reason> (+n MORE, SEE SR)" (the full list
  is in the SR), then the configurable label (default "RESEARCH USE ONLY - NOT
  FOR DIAGNOSIS"), lesion volume (and count, with findings), model name and version, and
  "IMAGE k OF n", drawn with :mod:`service.derive.font`.  The ADC-core
  volume is deliberately not burned in: a voxel-wise ADC threshold picks up
  noise and partial-volume voxels, and a number on a picture cannot carry the
  SR's qualifications.  No
  patient name, ID or date is burned in, so BurnedInAnnotation is ``NO``
  (that attribute is about identifying text); the label is also in
  ImageComments.
* **References**: SourceImageSequence points each image at its DWI source
  (purpose DCM 121322 "Source image for image processing operation") -- with
  ReferencedFrameNumber where the slice is a frame of an Enhanced MR object,
  the whole mosaic where it is a MOSAIC tile; DerivationDescription says what
  was done.
* BodyPartExamined is the source's ``HEAD``/``BRAIN`` (else ``HEAD``, which
  a brain DWI is): validators require a Laterality for a series whose body
  part could be paired.
* Patient and study attributes come from the first source, repaired as for
  the SEG and SR (:func:`service.derive.sources.with_patient_study_fallbacks`),
  so the three objects file identically in PACS.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from service.derive.algorithm import AlgorithmInfo
from service.derive.concepts import (
    DEFAULT_DEVICE_SERIAL_NUMBER,
    DEFAULT_MANUFACTURER,
    DEFAULT_SOFTWARE_VERSION,
    stable_uid,
)
from service.derive.findings import LesionFindings
from service.derive.font import CELL_HEIGHT, CELL_WIDTH, draw_text, wrap
from service.derive.references import (
    SliceReference,
    SliceSources,
    SourceLayout,
    as_slice_sources,
)
from service.derive.sources import (
    _copied_attribute_types,
    spatial_order,
    with_patient_study_fallbacks,
)
from service.domain import DomainOfValidity

__all__ = [
    "DEFAULT_OUTLINE_RGB",
    "DEFAULT_OVERLAY_LABEL",
    "OUTSIDE_RANGE_WARNING",
    "OverlayLayout",
    "auto_window",
    "build_overlay_series",
    "lesion_outline",
    "overlay_layout",
    "render_overlay_slice",
    "summary_lines",
    "validity_line",
]

log = logging.getLogger(__name__)

DEFAULT_OVERLAY_LABEL = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
#: First burned-in line of a result outside the model's validated range.
OUTSIDE_RANGE_WARNING = "OUTSIDE VALIDATED RANGE"
DEFAULT_OUTLINE_RGB: tuple[int, int, int] = (255, 0, 0)
_LABEL_RGB: tuple[int, int, int] = (255, 255, 0)
_TEXT_RGB: tuple[int, int, int] = (255, 255, 255)
#: Banner padding and extra space between lines, in unscaled font pixels.
_PAD = 4
_LEADING = 2
#: Text is drawn at 2x when a line then still holds this many characters.
_MIN_CHARS_AT_2X = 40
_SOURCE_IMAGE_FOR_PROCESSING = hd.sr.CodedConcept(
    "121322", "DCM", "Source image for image processing operation"
)
_SEGMENTATION_DERIVATION = hd.sr.CodedConcept("113076", "DCM", "Segmentation")
#: PatientOrientation letters for +x, +y, +z of DICOM patient space (LPS).
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


@dataclass(frozen=True, slots=True)
class OverlayLayout:
    """Pixel layout of one overlay image.

    The source slice (``rows`` x ``columns``) is upscaled by ``scale`` into
    rows ``[0, rows * scale)``; the text banner fills the ``banner_rows``
    rows below it; text is drawn at ``text_scale``.
    """

    rows: int
    columns: int
    scale: int
    text_scale: int
    banner_rows: int

    @property
    def image_rows(self) -> int:
        return self.rows * self.scale

    @property
    def width(self) -> int:
        return self.columns * self.scale

    @property
    def height(self) -> int:
        return self.image_rows + self.banner_rows

    @property
    def chars_per_line(self) -> int:
        return (self.width - 2 * _PAD * self.text_scale) // (CELL_WIDTH * self.text_scale)

    @property
    def line_height(self) -> int:
        return (CELL_HEIGHT + _LEADING) * self.text_scale

    @property
    def max_lines(self) -> int:
        return max(self.banner_rows - 2 * _PAD * self.text_scale, 0) // self.line_height

    def line_origin(self, n: int) -> tuple[int, int]:
        """(top, left) pixel of text line ``n`` (0-based) in the banner."""
        pad = _PAD * self.text_scale
        return (self.image_rows + pad + n * self.line_height, pad)


def overlay_layout(rows: int, columns: int, n_lines: int, *, min_size: int = 512) -> OverlayLayout:
    """The layout for a ``rows`` x ``columns`` slice with ``n_lines`` text lines."""
    if rows < 1 or columns < 1 or n_lines < 0 or min_size < 1:
        raise ValueError("rows, columns and min_size must be positive, n_lines >= 0")
    scale = max(1, math.ceil(min_size / max(rows, columns)))
    width = columns * scale
    text_scale = 2 if (width - 4 * _PAD) // (CELL_WIDTH * 2) >= _MIN_CHARS_AT_2X else 1
    line = (CELL_HEIGHT + _LEADING) * text_scale
    banner = n_lines * line + 2 * _PAD * text_scale if n_lines else 0
    return OverlayLayout(rows, columns, scale, text_scale, banner)


def auto_window(dwi: npt.ArrayLike) -> tuple[float, float]:
    """The default display window: 0.5th to 99.5th percentile of the finite values."""
    values = np.asarray(dwi, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (0.0, 1.0)
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if high <= low:
        high = low + 1.0
    return (low, high)


def _grey(dwi_slice: npt.NDArray[np.float64], window: tuple[float, float]) -> npt.NDArray[np.uint8]:
    low, high = window
    scaled = np.clip((np.nan_to_num(dwi_slice, nan=low) - low) / (high - low), 0.0, 1.0)
    grey: npt.NDArray[np.uint8] = np.rint(scaled * 255.0).astype(np.uint8)
    return grey


def lesion_outline(mask_slice: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Pixels of ``mask_slice`` with a 4-neighbour outside it (the edge counts as outside)."""
    m = np.asarray(mask_slice, dtype=bool)
    padded = np.pad(m, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    outline: npt.NDArray[np.bool_] = m & ~interior
    return outline


def validity_line(validity: DomainOfValidity | None) -> str | None:
    """The burned-in warning for a result outside the validated range (None: within/unknown).

    Only the first reason is burned in, with a count of the others: a banner
    that lists five reasons pushes the volume off a phone screen, and the SR
    holds them all.
    """
    if validity is None or validity.within:
        return None
    first, rest = validity.reasons[0], len(validity.reasons) - 1
    more = f" (+{rest} MORE, SEE SR)" if rest else ""
    return f"{OUTSIDE_RANGE_WARNING}: {first}{more}"


def summary_lines(
    lesion_volume_ml: float,
    algorithm: AlgorithmInfo,
    *,
    label: str = DEFAULT_OVERLAY_LABEL,
    findings: LesionFindings | None = None,
) -> list[str]:
    """The burned-in summary (one entry per logical line, before wrapping).

    An out-of-range warning comes first (a picture seen without its SR must
    not look like a validated result), then the label, the volume and the model.
    """
    warning = validity_line(findings.validity if findings is not None else None)
    lines = [warning] if warning else []
    if label.strip():
        lines.append(label)
    volume = f"LESION VOLUME {lesion_volume_ml:.1f} ML"
    if findings is not None:
        count = findings.lesion_count
        volume += f" IN {count} LESION{'S' if count != 1 else ''}"
    lines.append(volume)
    lines.append(f"MODEL {algorithm.name} {algorithm.version}")
    return lines


def render_overlay_slice(
    dwi_slice: npt.ArrayLike,
    mask_slice: npt.ArrayLike,
    *,
    window: tuple[float, float],
    layout: OverlayLayout,
    lines: Sequence[tuple[str, tuple[int, int, int]]] = (),
    outline_rgb: tuple[int, int, int] = DEFAULT_OUTLINE_RGB,
) -> npt.NDArray[np.uint8]:
    """One overlay image, (layout.height, layout.width, 3) uint8 RGB.

    ``lines`` are (already wrapped) text lines with their colours; at most as
    many as the layout's banner was sized for.
    """
    dwi = np.asarray(dwi_slice, dtype=np.float64)
    mask = np.asarray(mask_slice, dtype=bool)
    if dwi.shape != (layout.rows, layout.columns) or mask.shape != dwi.shape:
        raise ValueError("dwi_slice and mask_slice must match the layout's rows x columns")
    k = layout.scale
    grey = np.kron(_grey(dwi, window), np.ones((k, k), dtype=np.uint8))
    image = np.zeros((layout.height, layout.width, 3), dtype=np.uint8)
    image[: layout.image_rows] = grey[..., None]
    outline = lesion_outline(np.kron(mask, np.ones((k, k), dtype=bool)))
    image[: layout.image_rows][outline] = np.asarray(outline_rgb, dtype=np.uint8)
    if len(lines) > layout.max_lines:
        raise ValueError("more text lines than the banner was sized for")
    for n, (text, rgb) in enumerate(lines):
        top, left = layout.line_origin(n)
        draw_text(image, text, top, left, scale=layout.text_scale, rgb=rgb)
    return image


def _patient_orientation(iop: Sequence[float]) -> tuple[str, str]:
    """PatientOrientation (row direction, column direction) from ImageOrientationPatient.

    Uses the dominant axis of each direction (highdicom accepts one letter);
    an oblique plane is labelled by its nearest axis.
    """
    letters = []
    for vector in (iop[:3], iop[3:]):
        v = [float(x) for x in vector]
        axis = max(range(3), key=lambda a: abs(v[a]))
        letters.append(_AXIS_LETTERS[axis][0 if v[axis] > 0 else 1])
    return (letters[0], letters[1])


def _display_order(source_images: Sequence[Dataset]) -> list[int]:
    """Source indices in the order the source series scrolls (InstanceNumber)."""
    try:
        numbers = [int(ds.InstanceNumber) for ds in source_images]
    except (AttributeError, TypeError, ValueError):
        numbers = []
    if len(numbers) == len(source_images) and len(set(numbers)) == len(numbers):
        return sorted(range(len(source_images)), key=lambda i: numbers[i])
    return spatial_order(source_images)


def _study_attributes(ref: Dataset) -> dict[str, object]:
    """The constructor arguments highdicom's SCImage takes from the patient/study."""

    def value(keyword: str) -> object:
        v = ref.get(keyword)
        return None if v in (None, "") else v

    return {
        "patient_id": value("PatientID"),
        "patient_name": value("PatientName"),
        "patient_birth_date": value("PatientBirthDate"),
        "patient_sex": value("PatientSex"),
        "accession_number": value("AccessionNumber"),
        "study_id": value("StudyID"),
        "study_date": value("StudyDate"),
        "study_time": value("StudyTime"),
        "referring_physician_name": value("ReferringPhysicianName"),
    }


def _copy_patient_study(ref: Dataset, target: Dataset) -> None:
    """Copy the other root Patient/Study IE attributes, as highdicom does for the SEG."""
    for keyword in _copied_attribute_types(str(ref.SOPClassUID)):
        if keyword in ref and keyword not in target:
            target[keyword] = ref[keyword]


@dataclass(frozen=True, slots=True, eq=False)
class _OverlaySeries:
    """What every image of one overlay series shares (computed once per series)."""

    sources: SliceSources
    #: The patient/study header (first source, repaired as for the SEG and SR).
    ref: Dataset
    series_instance_uid: str
    #: Derive each image's SOP Instance UID from the series UID (a caller-given one) and its slice.
    stable_sop_uids: bool
    series_number: int
    series_description: str
    manufacturer: str
    model_name: str
    software_version: str
    device_serial_number: str
    window: tuple[float, float]
    layout: OverlayLayout
    #: The wrapped banner text lines (before "IMAGE k OF n") with their colours.
    banner: tuple[tuple[str, tuple[int, int, int]], ...]
    outline_rgb: tuple[int, int, int]
    pixel_spacing: tuple[float, float] | None
    orientation: tuple[str, str]
    body_part: str
    lossy: bool
    image_comments: str
    derivation: str


def build_overlay_series(
    source_images: Sequence[Dataset] | SliceSources,
    dwi: npt.ArrayLike,
    mask: npt.ArrayLike,
    *,
    lesion_volume_ml: float,
    algorithm: AlgorithmInfo,
    label: str = DEFAULT_OVERLAY_LABEL,
    findings: LesionFindings | None = None,
    window: tuple[float, float] | None = None,
    outline_rgb: tuple[int, int, int] = DEFAULT_OUTLINE_RGB,
    min_size: int = 512,
    series_number: int = 9903,
    series_description: str = "Ischemic lesion overlay (strokeseg)",
    manufacturer: str = DEFAULT_MANUFACTURER,
    software_version: str = DEFAULT_SOFTWARE_VERSION,
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    series_instance_uid: str | None = None,
) -> list[hd.sc.SCImage]:
    """Build one RGB Secondary Capture image per DWI slice; see the module docstring.

    ``dwi`` and ``mask`` have shape (slices, rows, columns) with slice ``i``
    on ``source_images[i]`` (headers suffice: the pixels come from ``dwi``,
    in stored-value units after the modality LUT).  Images are returned in
    display order with InstanceNumber 1..n.  With ``series_instance_uid``
    given, each image's SOP Instance UID is derived from it and its source's
    SOP Instance UID, so a re-run replaces rather than duplicates the series.

    ``source_images`` may be :class:`~service.derive.references.SliceSources`
    for frames of a multi-frame object (Enhanced MR) or MOSAIC tiles: each
    image then references its frame (ReferencedFrameNumber) or the mosaic,
    takes spacing and orientation from the slice grid, follows the frame or
    tile order, and derives its UID from the frame or tile as well.

    Raises
    ------
    ValueError
        On shape mismatches, a grey ``outline_rgb`` (it would read as
        signal), a label that the font would garble or that has line breaks,
        an empty window, or a series UID equal to the source series'.
    """
    sources, dwi_arr, mask_arr = _checked_slices(source_images, dwi, mask)
    _check_appearance(outline_rgb, label, findings, dwi_arr.shape)
    window = _checked_window(window, dwi_arr)
    series_uid = _new_series_uid(series_number, series_instance_uid, sources)
    summary = summary_lines(lesion_volume_ml, algorithm, label=label, findings=findings)
    banner, layout = _banner(summary, label, findings, dwi_arr.shape, min_size)
    spacing, iop = _plane(sources)
    series = _OverlaySeries(
        sources=sources,
        ref=with_patient_study_fallbacks(sources.first),
        series_instance_uid=series_uid,
        stable_sop_uids=bool(series_instance_uid),
        series_number=series_number,
        series_description=series_description,
        manufacturer=manufacturer,
        model_name=algorithm.name,
        software_version=software_version,
        device_serial_number=device_serial_number,
        window=window,
        layout=layout,
        banner=banner,
        outline_rgb=outline_rgb,
        pixel_spacing=(spacing[0] / layout.scale, spacing[1] / layout.scale) if spacing else None,
        orientation=_patient_orientation(iop),
        body_part=_body_part(sources.first),
        lossy=any(str(ds.get("LossyImageCompression", "")) == "01" for ds in sources.objects),
        image_comments="; ".join(summary),
        derivation=_derivation_description(window, layout, algorithm),
    )
    images = [
        _overlay_image(series, i, position, dwi_arr[i], mask_arr[i])
        for position, i in enumerate(_image_order(sources), start=1)
    ]
    log.info(
        "built lesion overlay series",
        extra={"series_instance_uid": series_uid, "images": len(images), "scale": layout.scale},
    )
    return images


def _checked_slices(
    source_images: Sequence[Dataset] | SliceSources, dwi: npt.ArrayLike, mask: npt.ArrayLike
) -> tuple[SliceSources, npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """The sources, DWI values and boolean mask, checked to be one slice stack of one size."""
    if len(source_images) == 0:
        raise ValueError("at least one source image is required")
    sources = as_slice_sources(source_images)
    dwi_arr = np.asarray(dwi, dtype=np.float64)
    mask_arr = np.asarray(mask)
    if mask_arr.dtype != np.bool_:
        if not np.issubdtype(mask_arr.dtype, np.integer) or not np.isin(mask_arr, (0, 1)).all():
            raise ValueError("mask must be boolean (or 0/1 integers)")
        mask_arr = mask_arr.astype(bool)
    if dwi_arr.ndim != 3 or dwi_arr.shape != mask_arr.shape:
        raise ValueError(f"dwi {dwi_arr.shape} and mask {mask_arr.shape} must be equal 3-D shapes")
    if dwi_arr.shape[0] != len(sources):
        raise ValueError(
            f"{dwi_arr.shape[0]} slices but {len(sources)} source images; "
            "slice i must lie on source_images[i]"
        )
    rows, columns = int(dwi_arr.shape[1]), int(dwi_arr.shape[2])
    if sources.layout is SourceLayout.CLASSIC:
        for i, ref in enumerate(sources.references):
            if (int(ref.dataset.Rows), int(ref.dataset.Columns)) != (rows, columns):
                raise ValueError(f"source image {i} is not {rows}x{columns}")
    elif sources.frame_shape != (rows, columns):
        raise ValueError(f"the source slices are not {rows}x{columns}")
    return sources, dwi_arr, mask_arr


def _check_appearance(
    outline_rgb: tuple[int, int, int],
    label: str,
    findings: LesionFindings | None,
    shape: tuple[int, ...],
) -> None:
    """Refuse an outline that reads as signal, a label the banner cannot hold, and findings
    of another grid (their numbers would be printed on the wrong images)."""
    if len(set(outline_rgb)) == 1 or any(not 0 <= c <= 255 for c in outline_rgb):
        raise ValueError("outline_rgb must be a non-grey colour with components 0..255")
    if any(ch in label for ch in "\r\n\f\\"):
        raise ValueError("the overlay label must be one line of text without backslashes")
    if findings is not None and findings.shape != shape:
        raise ValueError("findings were computed on another grid than the overlay's")


def _checked_window(
    window: tuple[float, float] | None, dwi: npt.NDArray[np.float64]
) -> tuple[float, float]:
    """The caller's window or :func:`auto_window`; refused when empty."""
    window = window if window is not None else auto_window(dwi)
    if not window[1] > window[0]:
        raise ValueError(f"window must be (low, high) with high > low, got {window}")
    return window


def _new_series_uid(
    series_number: int, series_instance_uid: str | None, sources: SliceSources
) -> str:
    """The overlay's Series Instance UID (the caller's, else a new one): never a source's,
    since the overlay would then be filed as images of the DWI series."""
    if series_number < 1:
        raise ValueError("series_number must be positive")
    series_uid = series_instance_uid or hd.UID()
    if series_uid in {str(ds.SeriesInstanceUID) for ds in sources.objects}:
        raise ValueError("the overlay must be in a new series, not the source series")
    return series_uid


def _banner(
    summary: Sequence[str],
    label: str,
    findings: LesionFindings | None,
    shape: tuple[int, ...],
    min_size: int,
) -> tuple[tuple[tuple[str, tuple[int, int, int]], ...], OverlayLayout]:
    """The summary wrapped to the image width, with colours, and the layout sized for it
    plus the "IMAGE k OF n" line; ``shape`` is the DWI's (slices, rows, columns).

    The warning (when there is one) and the label are highlighted; the numbers are white.
    """
    rows, columns = int(shape[1]), int(shape[2])
    probe = overlay_layout(rows, columns, 0, min_size=min_size)
    highlighted = int(label.strip() != "") + int(
        validity_line(findings.validity if findings is not None else None) is not None
    )
    lines: list[tuple[str, tuple[int, int, int]]] = []
    for k, line in enumerate(summary):
        rgb = _LABEL_RGB if k < highlighted else _TEXT_RGB
        lines.extend((part, rgb) for part in wrap(line, probe.chars_per_line))
    return tuple(lines), overlay_layout(rows, columns, len(lines) + 1, min_size=min_size)


def _plane(sources: SliceSources) -> tuple[list[float] | None, list[float]]:
    """PixelSpacing (None when a classic source lacks it) and ImageOrientationPatient.

    A classic image states both; an Enhanced MR object has them per frame
    and a MOSAIC's describe the tile grid too, so those come from the slice grid.
    """
    first = sources.first
    if sources.layout is SourceLayout.CLASSIC:
        spacing = [float(v) for v in first.PixelSpacing] if "PixelSpacing" in first else None
        return spacing, [float(v) for v in first.ImageOrientationPatient]
    assert sources.geometry is not None
    geometry = sources.geometry
    return list(geometry.pixel_spacing), [*geometry.row_cosine, *geometry.column_cosine]


def _body_part(first: Dataset) -> str:
    """The source's ``HEAD``/``BRAIN``, else ``HEAD`` (a brain DWI is one)."""
    body_part = str(first.get("BodyPartExamined", "") or "").strip().upper()
    return body_part if body_part in ("HEAD", "BRAIN") else "HEAD"


def _derivation_description(
    window: tuple[float, float], layout: OverlayLayout, algorithm: AlgorithmInfo
) -> str:
    return (
        f"DWI windowed to [{window[0]:.6g}, {window[1]:.6g}], upscaled {layout.scale}x, "
        f"lesion outline from {algorithm.name} {algorithm.version} burned in; not for diagnosis "
        "on its own: see the SEG and SR of this series' study"
    )


def _image_order(sources: SliceSources) -> list[int]:
    """Slice indices in the order the source scrolls: InstanceNumber (classic), else
    frame or tile order."""
    if sources.layout is SourceLayout.CLASSIC:
        return _display_order([ref.dataset for ref in sources.references])
    order = sources.display_order()
    assert order is not None
    return order


def _overlay_image(
    series: _OverlaySeries,
    i: int,
    position: int,
    dwi_slice: npt.NDArray[np.float64],
    mask_slice: npt.NDArray[np.bool_],
) -> hd.sc.SCImage:
    """The overlay image of slice ``i``, number ``position`` in display order."""
    layout = series.layout
    counter = f"IMAGE {position} OF {len(series.sources)}"
    pixels = render_overlay_slice(
        dwi_slice,
        mask_slice,
        window=series.window,
        layout=layout,
        lines=[*series.banner, (counter[: layout.chars_per_line], _TEXT_RGB)],
        outline_rgb=series.outline_rgb,
    )
    sop_uid = (
        stable_uid("overlay-image", series.series_instance_uid, series.sources.slice_key(i))
        if series.stable_sop_uids
        else hd.UID()
    )
    ref = series.ref
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=str(series.sources.first.StudyInstanceUID),
        series_instance_uid=series.series_instance_uid,
        series_number=series.series_number,
        sop_instance_uid=sop_uid,
        instance_number=position,
        manufacturer=series.manufacturer,
        pixel_spacing=series.pixel_spacing,
        patient_orientation=series.orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series.series_description,
        manufacturer_model_name=series.model_name,
        software_versions=series.software_version,
        device_serial_number=series.device_serial_number,
        specific_character_set=ref.get("SpecificCharacterSet"),
        **_study_attributes(ref),  # type: ignore[arg-type]
    )
    _copy_patient_study(ref, sc)
    _describe_derivation(sc, series, series.sources.references[i])
    return sc


def _describe_derivation(sc: Dataset, series: _OverlaySeries, source: SliceReference) -> None:
    """What the image is and where it comes from: body part, annotation, conversion type,
    comments, derivation and the reference to its source slice's object (and frame)."""
    # An unpaired body part: without it dciodvfy requires Laterality (type 2C).
    sc.BodyPartExamined = series.body_part
    sc.BurnedInAnnotation = "NO"
    sc.ConversionType = "WSD"  # made by a workstation from images, not "DI" (a digital interface)
    sc.ImageComments = series.image_comments
    sc.DerivationDescription = series.derivation
    sc.DerivationCodeSequence = [_SEGMENTATION_DERIVATION]
    item = Dataset()
    item.ReferencedSOPClassUID = source.dataset.SOPClassUID
    item.ReferencedSOPInstanceUID = source.dataset.SOPInstanceUID
    if source.frame_number is not None:
        item.ReferencedFrameNumber = source.frame_number
    item.PurposeOfReferenceCodeSequence = [_SOURCE_IMAGE_FOR_PROCESSING]
    sc.SourceImageSequence = [item]
    if series.lossy:
        sc.LossyImageCompression = "01"
