"""Checks and repairs of the source image headers our SEG and SR derive from.

highdicom 0.28 builds a SEG's or SR's Patient and Study modules from the
*first* source image by plain attribute access (``src.PatientID``,
``src.StudyDate``, ...).  A source that lacks one of these type 2 attributes
makes the constructor die with an ``AttributeError``, and one with a
malformed date or a free-text sex ("MALE") makes it raise ``ValueError`` --
both far from the cause.  Scanners and anonymisers do send such headers, and
a missing accession number must not cost a patient their stroke result.

The SEG's Pixel Measures are likewise taken from the first source, and
highdicom ignores a ``pixel_measures`` argument whose spacing matches the
source's: a source without SliceThickness (type 2, so legally empty) crashes
the constructor, and an empty one gives a SEG whose type 1C SliceThickness
is empty (a dciodvfy *Error*).  Orientation is compared for exact equality
across slices, so rounding noise in ImageOrientationPatient fails too.

So before handing sources to highdicom we (1) validate what we truly need
(same series, same frame of reference, geometry present) and raise a
``ValueError`` that names the problem, and (2) give highdicom patched copies:
absent type 2 patient/study attributes present but empty and unparsable
values emptied (an empty type 2 value is what the standard prescribes for
"unknown"), undeclared non-ASCII text given a character set, other invalid
copied values dropped, a usable SliceThickness and SpacingBetweenSlices on
the first source, and one orientation for all.  Each of these was a highdicom
exception or a dciodvfy *Error* in our output before (see the tests).  The
caller's datasets are never modified.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, TM, validate_value

from service.derive.findings import GridGeometry

__all__ = [
    "check_source_images",
    "grid_geometry",
    "prepare_sources",
    "spatial_order",
    "with_patient_study_fallbacks",
]

log = logging.getLogger(__name__)

#: Type 2 Patient / General Study attributes highdicom reads from the first source.
_TYPE2_TEXT = (
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
_TYPE2_DATES = ("PatientBirthDate", "StudyDate")
_TYPE2_TIMES = ("StudyTime",)
_PATIENT_SEX_VALUES = frozenset({"M", "F", "O"})

#: Attributes without which a slice cannot be placed in patient space.
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def check_source_images(source_images: Sequence[Dataset], frame_shape: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless the sources can carry a SEG of ``frame_shape``.

    Requirements: classic single-frame images of one series in one study and
    one frame of reference, each with plane geometry, with unique SOP
    Instance UIDs and unique plane positions, and ``frame_shape`` equal to
    their (Rows, Columns).  Messages name slice indices and attributes only,
    never patient data.
    """
    if len(source_images) == 0:
        raise ValueError("at least one source image is required")
    for i, ds in enumerate(source_images):
        if not isinstance(ds, Dataset):
            raise TypeError(f"source image {i} is a {type(ds).__name__}, not a pydicom Dataset")
        missing = [
            k
            for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
            + ("FrameOfReferenceUID",)
            + _GEOMETRY
            if k not in ds or ds[k].value in (None, "")
        ]
        if missing:
            raise ValueError(f"source image {i} lacks {', '.join(missing)}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(
                f"source image {i} is multi-frame; build_lesion_seg takes classic "
                "single-frame images, one per mask slice"
            )
        if (int(ds.Rows), int(ds.Columns)) != frame_shape:
            raise ValueError(
                f"mask slices are {frame_shape[0]}x{frame_shape[1]} but source image {i} "
                f"is {int(ds.Rows)}x{int(ds.Columns)} (Rows x Columns)"
            )

    first = source_images[0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds[keyword].value) for ds in source_images}
        if len(values) > 1:
            raise ValueError(f"source images must share one {keyword}; found {len(values)}")

    uids = [str(ds.SOPInstanceUID) for ds in source_images]
    if len(set(uids)) != len(uids):
        raise ValueError("source images contain the same SOPInstanceUID more than once")

    iop0 = np.asarray(first.ImageOrientationPatient, dtype=float)
    for i, ds in enumerate(source_images):
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), iop0, atol=1e-4):
            raise ValueError(f"source image {i} has a different ImageOrientationPatient")
    positions = np.round(
        np.array([[float(v) for v in ds.ImagePositionPatient] for ds in source_images]), 3
    )
    if len(np.unique(positions, axis=0)) != len(positions):
        raise ValueError(
            "two or more source images share one ImagePositionPatient "
            "(mixed b-values or repeated acquisitions in one series?)"
        )


def with_patient_study_fallbacks(ds: Dataset) -> Dataset:
    """``ds``, or a deep copy whose patient/study header highdicom can copy validly.

    What highdicom copies from the first source ends up in every object we
    send, so that is what we repair, in this order:

    1. text with non-ASCII bytes but no SpecificCharacterSet: declare
       ISO_IR 192 if the bytes are valid UTF-8, else ISO_IR 100 (pydicom's
       own fallback reading), so the copied text is valid where it lands;
    2. type 2 attributes highdicom reads by attribute access: absent or
       unparsable -> empty ("unknown"); PatientSex "m"/" F " -> "M"/"F";
    3. other Patient/Study module attributes with values invalid for their
       VR (e.g. PatientAge "74"): type 3 dropped, type 2 emptied.  Identity
       attributes (names, IDs, accession number) are kept verbatim even if
       invalid: a result that does not match its study in PACS is worse than
       a validator warning.

    Logs the keywords it changed, never their values (they may identify the
    patient).  The caller's dataset is never modified.
    """
    fixed = copy.deepcopy(ds)
    changes: dict[str, str] = {}  # keyword -> why
    _declare_character_set(fixed, changes)
    _fill_type2(fixed, changes)
    _repair_copied_values(fixed, changes)
    if not changes:
        return ds
    log.warning(
        "source patient/study header repaired for the derived objects: %s",
        ", ".join(f"{k} ({why})" for k, why in sorted(changes.items())),
    )
    return fixed


def _declare_character_set(fixed: Dataset, changes: dict[str, str]) -> None:
    """Step 1: give undeclared non-ASCII text a SpecificCharacterSet.

    Set before any text element of the copy is decoded: pydicom decodes raw
    values lazily with the dataset's character set at that moment.
    """
    charset = _undeclared_character_set(fixed)
    if charset is not None:
        fixed.SpecificCharacterSet = charset
        changes["SpecificCharacterSet"] = f"undeclared, non-ASCII text: {charset}"


def _fill_type2(fixed: Dataset, changes: dict[str, str]) -> None:
    """Step 2: the type 2 attributes highdicom reads by attribute access, present and
    parsable (absent or unparsable -> empty, "unknown"); PatientSex one of M/F/O."""
    for keyword in _TYPE2_TEXT:
        if keyword not in fixed:
            setattr(fixed, keyword, "")
            changes[keyword] = "absent"
    for keyword in _TYPE2_DATES + _TYPE2_TIMES:
        if keyword not in fixed:
            setattr(fixed, keyword, "")
            changes[keyword] = "absent"
            continue
        value = fixed[keyword].value
        if value in (None, ""):
            continue
        parse = DA if keyword in _TYPE2_DATES else TM
        try:
            parse(str(value))
        except ValueError:
            setattr(fixed, keyword, "")
            changes[keyword] = "unparsable"
    if "PatientSex" not in fixed:
        fixed.PatientSex = ""
        changes["PatientSex"] = "absent"
    elif fixed.PatientSex not in (None, "") and str(fixed.PatientSex) not in _PATIENT_SEX_VALUES:
        sex = str(fixed.PatientSex).strip().upper()
        fixed.PatientSex = sex if sex in _PATIENT_SEX_VALUES else ""
        changes["PatientSex"] = "not M/F/O"


def _repair_copied_values(fixed: Dataset, changes: dict[str, str]) -> None:
    """Step 3: other copied Patient/Study attributes with invalid values: type 3
    dropped, type 2 emptied; identity attributes kept verbatim."""
    for keyword, attr_type in _copied_attribute_types(str(fixed.SOPClassUID)).items():
        if keyword in changes or keyword in _IDENTITY or keyword not in fixed:
            continue
        elem = fixed[keyword]
        if elem.VR == "SQ":
            why = _sequence_problem(elem.value)
            if not why:
                continue
            if attr_type.startswith("2"):
                setattr(fixed, keyword, [])
                changes[keyword] = f"{why}, emptied"
            else:
                delattr(fixed, keyword)
                changes[keyword] = f"{why}, dropped"
            continue
        if _is_valid(elem.VR, elem.value):
            continue
        if attr_type.startswith("2"):
            setattr(fixed, keyword, "")
            changes[keyword] = "invalid value, emptied"
        elif attr_type.startswith("3"):
            delattr(fixed, keyword)
            changes[keyword] = "invalid value, dropped"


_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})
_CODE_VALUES = ("CodeValue", "LongCodeValue", "URNCodeValue")


def _sequence_problem(items: Sequence[Dataset]) -> str:
    """Why a copied sequence would be invalid in our objects ("" when it is fine).

    Philips writes an empty ProcedureCodeSequence (type 3: an empty type 3
    sequence is a dciodvfy error); code items without a value, scheme or
    meaning are invalid wherever they are copied.
    """
    if len(items) == 0:
        return "empty sequence"
    for item in items:
        if not any(k in item for k in (*_CODE_VALUES, "CodeMeaning", "CodingSchemeDesignator")):
            continue  # not a code item
        has_value = any(item.get(k, None) for k in _CODE_VALUES)
        has_scheme = bool(item.get("CodingSchemeDesignator", None) or item.get("URNCodeValue", None))
        if not (has_value and has_scheme and item.get("CodeMeaning", None)):
            return "incomplete code item"
    return ""

#: Kept verbatim even when invalid, so the result files with its study.
_IDENTITY = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "AccessionNumber",
        "StudyID",
        "StudyInstanceUID",
        "ReferringPhysicianName",
    }
)


def _undeclared_character_set(ds: Dataset) -> str | None:
    """A SpecificCharacterSet for ``ds`` if it has non-ASCII text but declares none."""
    if "SpecificCharacterSet" in ds:
        return None
    raw_non_ascii: list[bytes] = []
    decoded_non_ascii = False
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)  # raw (undecoded) where pydicom has not converted it yet
        if elem is None:
            continue
        vr = elem.VR or _dictionary_vr_or_none(tag)
        if vr not in _TEXT_VRS:
            continue
        value = elem.value
        if isinstance(value, bytes):
            if any(b > 0x7F for b in value):
                raw_non_ascii.append(value)
        elif value is not None and not str(value).isascii():
            decoded_non_ascii = True
    if not raw_non_ascii and not decoded_non_ascii:
        return None
    for value in raw_non_ascii:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return "ISO_IR 100"
    return "ISO_IR 192"


def _dictionary_vr_or_none(tag: int) -> str | None:
    """The data dictionary VR of ``tag`` (implicit VR files carry none)."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _is_valid(vr: str, value: object) -> bool:
    """Whether every value of an element is valid for its VR (pydicom's rules)."""
    if value is None or value == "":
        return True
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        for v in values:
            validate_value(vr, v, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=16)
def _copied_attribute_types(sop_class_uid: str) -> dict[str, str]:
    """Keyword -> attribute type of the root-level Patient and Study IE attributes
    that highdicom copies from a source of this SOP class.

    Uses highdicom's private copy of the standard's module tables (the same
    ones its copy uses); if a future highdicom moves them, this check is
    skipped rather than failing every job.
    """
    try:
        from highdicom._standard_utils import (
            get_iod_module_map,
            get_module_attribute_map,
            get_sop_class_iod_map,
        )
    except ImportError:  # pragma: no cover - depends on highdicom internals
        log.warning("highdicom module tables unavailable; not validating copied attributes")
        return {}
    iod = get_sop_class_iod_map().get(sop_class_uid)
    if iod is None:
        return {}
    attribute_map = get_module_attribute_map()
    types: dict[str, str] = {}
    for module in get_iod_module_map()[iod]:
        if module["ie"] not in ("Patient", "Study"):
            continue
        for item in attribute_map[module["key"]]:
            if len(item["path"]) == 0:
                types[str(item["keyword"])] = str(item["type"])
    return types


def _slice_normal(iop: Sequence[float]) -> npt.NDArray[np.float64]:
    """Unit normal of the image plane (row cosine x column cosine)."""
    v = np.asarray([float(x) for x in iop], dtype=np.float64)
    n: npt.NDArray[np.float64] = np.cross(v[:3], v[3:])
    return n / float(np.linalg.norm(n))


def _regular_slice_spacing(source_images: Sequence[Dataset]) -> float | None:
    """Centre-to-centre slice distance from the plane positions, if regular.

    None for a single slice or irregular spacing (then no single value is
    true for the whole SEG, and highdicom omits it too).
    """
    if len(source_images) < 2:
        return None
    normal = _slice_normal(source_images[0].ImageOrientationPatient)
    offsets = np.sort(
        [float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in source_images]
    )
    steps = np.diff(offsets)
    if steps.min() <= 0 or not np.allclose(steps, steps.mean(), rtol=1e-2, atol=1e-3):
        return None
    return float(steps.mean())


def _positive_ds(ds: Dataset, keyword: str) -> float | None:
    """``ds.<keyword>`` as a positive float, or None if absent, empty or invalid."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and np.isfinite(number) else None


def prepare_sources(source_images: Sequence[Dataset]) -> list[Dataset]:
    """The sources as highdicom should see them; see the module docstring.

    Call :func:`check_source_images` first.  Returns the caller's datasets
    where nothing needs fixing and patched deep copies where something does.

    Raises
    ------
    ValueError
        If no slice thickness can be found or derived (a single slice without
        SliceThickness): a SEG without one would not be valid.
    """
    first = with_patient_study_fallbacks(source_images[0])
    spacing = _regular_slice_spacing(source_images)
    measures: dict[str, object] = {}

    if _positive_ds(first, "SliceThickness") is None:
        thickness = next(
            (t for t in (_positive_ds(ds, "SliceThickness") for ds in source_images) if t), None
        )
        why = "another slice's SliceThickness"
        if thickness is None and spacing is not None:
            thickness, why = spacing, "the slice spacing (contiguous slices assumed)"
        if thickness is None:
            raise ValueError(
                "source images give no SliceThickness and no regular slice spacing "
                "to derive one from"
            )
        log.warning("first source image lacks a valid SliceThickness; using %s", why)
        measures["SliceThickness"] = f"{thickness:.6g}"

    declared = _positive_ds(first, "SpacingBetweenSlices")
    if "SpacingBetweenSlices" in first and (
        declared is None or spacing is None or abs(declared - spacing) > 0.01 * spacing
    ):
        # highdicom copies a declared value verbatim and computes one from the
        # positions only when it is absent: drop a value the positions contradict.
        log.warning("SpacingBetweenSlices disagrees with the slice positions; recomputing it")
        measures["SpacingBetweenSlices"] = None

    if measures:
        if first is source_images[0]:
            first = copy.deepcopy(first)
        for keyword, value in measures.items():
            if value is None:
                delattr(first, keyword)
            else:
                setattr(first, keyword, value)

    prepared = [first]
    iop0 = [float(v) for v in first.ImageOrientationPatient]
    for ds in source_images[1:]:
        if [float(v) for v in ds.ImageOrientationPatient] != iop0:
            # Equal within check_source_images' tolerance; highdicom wants identity.
            ds = copy.deepcopy(ds)
            ds.ImageOrientationPatient = first.ImageOrientationPatient
        prepared.append(ds)
    return prepared


def spatial_order(source_images: Sequence[Dataset]) -> list[int]:
    """Indices of ``source_images`` sorted along the slice normal (ascending)."""
    normal = _slice_normal(source_images[0].ImageOrientationPatient)
    offsets = [
        float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in source_images
    ]
    return sorted(range(len(source_images)), key=lambda i: offsets[i])


def grid_geometry(source_images: Sequence[Dataset]) -> GridGeometry:
    """The :class:`GridGeometry` of a mask whose slice ``i`` lies on ``source_images[i]``.

    For callers that have source headers but no :class:`service.domain.ImageVolume`
    (tests, offline tools); the pipeline uses ``GridGeometry.from_volume(study.dwi)``.
    The sources must be in spatial order (either direction).  The slice
    spacing comes from the positions (mean step) or, for one slice, from
    SliceThickness.

    Raises
    ------
    ValueError
        If a source lacks geometry, the orientations differ, or the slices are
        not in spatial order.
    """
    if len(source_images) == 0:
        raise ValueError("at least one source image is required")
    for i, ds in enumerate(source_images):
        missing = [
            k
            for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
            if k not in ds
        ]
        if missing:
            raise ValueError(f"source image {i} lacks {', '.join(missing)}")
    iop = np.asarray([float(v) for v in source_images[0].ImageOrientationPatient])
    for i, ds in enumerate(source_images):
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise ValueError(f"source image {i} has a different ImageOrientationPatient")
    origins = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in source_images])
    if len(source_images) > 1:
        offsets = origins @ _slice_normal([float(v) for v in iop])
        spacing = float(np.abs(np.diff(offsets)).mean())
    else:
        thickness = _positive_ds(source_images[0], "SliceThickness")
        if thickness is None:
            raise ValueError("a single source image needs a SliceThickness to give voxels a volume")
        spacing = thickness
    first = source_images[0]
    return GridGeometry(
        slice_origins=origins,
        row_cosine=(float(iop[0]), float(iop[1]), float(iop[2])),
        column_cosine=(float(iop[3]), float(iop[4]), float(iop[5])),
        pixel_spacing=(float(first.PixelSpacing[0]), float(first.PixelSpacing[1])),
        slice_spacing=spacing,
    )
