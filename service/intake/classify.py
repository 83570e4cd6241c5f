"""Classify one MR image or frame: high-b DWI, b0, directional, ADC, or other.

Scanners write the b-value in different places; this module knows them all
and trusts none of them more than the evidence allows:

* standard: DiffusionBValue (0018,9087) and DiffusionDirectionality
  (0018,9075), top level (classic images) or in the per-frame
  MRDiffusionSequence (Enhanced MR); ImageType / FrameType values
  (ADC, TRACEW, derived maps);
* Siemens: the CSA image header (0029,xx10) ``B_value`` (read with nibabel),
  (0019,xx0C) B_value and (0019,xx0D) DiffusionDirectionality of
  "SIEMENS MR HEADER" (XA classic exports), SequenceName ``*ep_b1000t``;
* GE: the first value of (0043,xx39) "GEMS_PARM_01" modulo 1e9 (some
  releases add 1e9), (0019,xxE0) "GEMS_ACQU_01" = number of DTI directions
  (0 marks a trace image), gradient (0019,xxBB/BC/BD);
* Philips: (2001,xx03) "Philips Imaging DD 001" b-factor, (2001,xx04)
  direction ('I' = isotropic), (2005,xxB0..B2) gradient, and in Enhanced MR
  the private per-frame sequence (2005,xx0F) "Philips MR Imaging DD 005";
* UIH (uMR): (0065,1009) b-value and (0065,1037) gradient direction, as
  dcm2niix reads them (fixed element numbers, whatever the creator);
* Canon/Toshiba: DiffusionBValue only on b > 0 images, or ImageComments
  ``b=1000(x,y,z)``; the b0 image carries none (resolved per series by
  :func:`service.intake.planes.resolve_series_conventions`, never per image).

Every source found is collected; when two disagree the image is ``other``
with the conflict as its reason.  When no b-value can be found the image is
``other`` too: nothing here guesses from image order, series descriptions or
pixel statistics.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from service.domain import ImageRole
from service.imaging import functional_group_item

log = logging.getLogger(__name__)

with warnings.catch_warnings():
    # nibabel.nicom warns on import that its *readers* are experimental; we use
    # only the CSA header parser, which is stable.
    warnings.simplefilter("ignore")
    from nibabel.nicom import csareader

#: ImageType / FrameType values of derived maps that are not the ADC we need
#: (exponential ADC, FA, ...): recognised and ignored.
DERIVED_MAP_TOKENS = frozenset({"EADC", "EXP", "EXPADC", "EXP_ADC", "FA", "TRACEW_EXP", "CALC_BVALUE"})

#: Two b-value sources agree when within this (s/mm2).
B_VALUE_TOLERANCE = 1.0
#: GE adds multiples of 1e9 to (0043,xx39)[0] on some software releases.
GE_B_VALUE_MODULUS = 1_000_000_000

Vector3 = tuple[float, float, float]


class Vendor(enum.StrEnum):
    """Manufacturer families whose conventions differ."""

    SIEMENS = "siemens"
    GE = "ge"
    PHILIPS = "philips"
    CANON = "canon"  # Canon Medical, formerly Toshiba
    UIH = "uih"  # United Imaging Healthcare (uMR)
    UNKNOWN = "unknown"


def vendor_of(ds: Dataset) -> Vendor:
    """The manufacturer family from Manufacturer (0008,0070)."""
    name = str(ds.get("Manufacturer", "") or "").upper()
    if "SIEMENS" in name:
        return Vendor.SIEMENS
    if name.startswith("GE ") or name in ("GE", "GEMS") or "GE MEDICAL" in name or "GE HEALTHCARE" in name:
        return Vendor.GE
    if "PHILIPS" in name:
        return Vendor.PHILIPS
    if "CANON" in name or "TOSHIBA" in name:
        return Vendor.CANON
    if name == "UIH" or "UNITED IMAGING" in name:
        return Vendor.UIH
    return Vendor.UNKNOWN


@dataclass(frozen=True, slots=True)
class ImageClass:
    """The verdict on one image or frame.

    ``b_value_source`` names the element the b-value came from (for notes
    and the conformance table); ``direction`` is the gradient direction of a
    directional image when the header gives one; ``reason`` says why an
    image is ``other`` (or records a caveat of the decision).
    """

    role: ImageRole
    b_value: float | None = None
    b_value_source: str = ""
    direction: Vector3 | None = None
    reason: str = ""


# Reasons shared with the study assembly.
NO_B_VALUE = "no b-value in any known element"


# --------------------------------------------------------------------------
# Element access that survives implicit VR (private values arrive as bytes)


def private_element_value(ds: Dataset, group: int, creator: str, offset: int) -> Any | None:
    """Value of private element (group, creator, offset), or None.

    The creator is matched case-insensitively and without padding, because
    archives and anonymisers rewrite these strings.
    """
    block = _private_creators(ds).get((group, creator.strip().upper()))
    if block is None:
        return None
    elem = ds.get((group, (block << 8) | offset))
    return None if elem is None else elem.value


_CREATORS_ATTRIBUTE = "_strokeseg_private_creators"


def _private_creators(ds: Dataset) -> dict[tuple[int, str], int]:
    """(group, creator upper-case) -> block of every private creator in ``ds``.

    Built once per dataset (a Philips classic image has hundreds of elements
    and classification asks for a dozen private ones) and rebuilt when the
    dataset gained or lost elements since.
    """
    cached = ds.__dict__.get(_CREATORS_ATTRIBUTE)
    if cached is not None and cached[0] == len(ds):
        return cached[1]  # type: ignore[no-any-return]
    creators: dict[tuple[int, str], int] = {}
    for tag in map(int, ds.keys()):
        group, element = tag >> 16, tag & 0xFFFF
        if group % 2 == 0 or not 0x10 <= element <= 0xFF:
            continue
        value = ds[tag].value
        if isinstance(value, bytes):
            value = value.decode("latin-1", errors="replace")
        creators.setdefault((group, str(value).strip().strip("\x00").upper()), element)
    object.__setattr__(ds, _CREATORS_ATTRIBUTE, (len(ds), creators))
    return creators


def _numbers(value: Any, binary_format: str | None = None) -> list[float]:
    """Numbers in an element value: numeric, multi-valued, text or raw bytes."""
    if value is None:
        return []
    if isinstance(value, bytes):
        if binary_format is not None:
            size = struct.calcsize("<" + binary_format)
            if size and len(value) >= size and len(value) % size == 0:
                return [float(v) for v in struct.unpack(f"<{len(value) // size}{binary_format}", value)]
        value = value.decode("latin-1", errors="replace").strip("\x00 ").split("\\")
    if isinstance(value, str):
        value = value.split("\\")
    if not isinstance(value, (list, tuple)) and not hasattr(value, "__iter__"):
        value = [value]
    out: list[float] = []
    for v in value:
        try:
            number = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out.append(number)
    return out


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    if isinstance(value, (list, tuple)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip("\x00 ").strip()


def image_type_tokens(value: Any) -> tuple[str, ...]:
    """ImageType / FrameType values, upper case."""
    if value is None:
        return ()
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    if isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).strip().upper() for v in value)


def _image_type(ds: Dataset) -> tuple[str, ...]:
    return image_type_tokens(ds.get("ImageType", None))


# --------------------------------------------------------------------------
# Siemens CSA


def csa_image_header(ds: Dataset) -> dict[str, Any] | None:
    """The parsed Siemens CSA image header (0029,xx10), or None.

    A header that is present but unreadable is logged and treated as absent;
    what it would have told us then comes from other elements or not at all.
    """
    if (0x0029, 0x0010) not in ds:
        return None
    try:
        header = csareader.get_csa_header(ds, "image")
    except Exception as exc:  # nibabel raises CSAReadError, struct.error, AssertionError...
        log.warning("unreadable Siemens CSA image header: %s", type(exc).__name__)
        return None
    return header if isinstance(header, dict) else None


def csa_value(csa: dict[str, Any] | None, name: str) -> Any | None:
    """First item of CSA element ``name``, or None."""
    if csa is None:
        return None
    try:
        return csareader.get_scalar(csa, name)
    except (KeyError, IndexError, TypeError):
        return None


def csa_vector(csa: dict[str, Any] | None, name: str, n: int) -> np.ndarray | None:
    """CSA element ``name`` as an ``n``-vector, or None when absent or malformed."""
    if csa is None:
        return None
    try:
        vector = csareader.get_vector(csa, name, n)
    except (KeyError, ValueError, TypeError):
        return None
    if vector is None:
        return None
    return np.asarray(vector, dtype=np.float64)


# --------------------------------------------------------------------------
# Evidence


@dataclass(slots=True)
class _Evidence:
    """What the headers of one image say about diffusion."""

    b_values: list[tuple[str, float]]
    trace: list[str]  # sources saying "trace / isotropic / b0"
    directional: list[str]  # sources saying "one gradient direction"
    direction: Vector3 | None = None
    # Conventions in names and vendor-defined values (Siemens SequenceName,
    # ImageType TRACEW): used only when no diffusion element says anything,
    # never to overrule one.
    weak_b_values: list[tuple[str, float]] = field(default_factory=list)
    weak_trace: list[str] = field(default_factory=list)
    weak_directional: list[str] = field(default_factory=list)

    def settle(self, tokens: tuple[str, ...]) -> None:
        """Fall back on the weak sources where the structured ones are silent.

        A name alone never makes a diffusion image: the weak b-value counts
        only when ImageType/FrameType also says DIFFUSION (or TRACEW).
        """
        if not self.b_values and {"DIFFUSION", "TRACEW"} & set(tokens):
            self.b_values = list(self.weak_b_values)
        if not self.trace and not self.directional:
            self.trace = list(self.weak_trace)
            self.directional = list(self.weak_directional)

    def add_direction(self, source: str, vector: Sequence[float] | None) -> None:
        if vector is None or len(vector) != 3:
            return
        v = np.asarray(vector, dtype=np.float64)
        norm = float(np.linalg.norm(v))
        if norm < 1e-6:
            return  # all zero: no direction (trace or b0)
        self.directional.append(source)
        if self.direction is None:
            u = v / norm
            self.direction = (float(u[0]), float(u[1]), float(u[2]))


_SEQUENCE_NAME_B = re.compile(r"_b(\d+)(t?)(#\d+)?$", re.IGNORECASE)
_CANON_COMMENT_B = re.compile(r"^\s*b\s*=\s*(\d+(?:\.\d*)?)\s*(?:\(([^)]*)\))?", re.IGNORECASE)


def _standard_evidence(item: Dataset, evidence: _Evidence, where: str) -> None:
    """DiffusionBValue / DiffusionDirectionality / DiffusionGradientOrientation in ``item``."""
    b = _numbers(item.get("DiffusionBValue", None), "d")
    if b:
        evidence.b_values.append((f"DiffusionBValue (0018,9087){where}", b[0]))
    directionality = _text(item.get("DiffusionDirectionality", None)).upper()
    if directionality in ("ISOTROPIC", "NONE"):
        evidence.trace.append(f"DiffusionDirectionality {directionality}{where}")
    elif directionality in ("DIRECTIONAL", "BMATRIX"):
        evidence.directional.append(f"DiffusionDirectionality {directionality}{where}")
    gradient = item.get("DiffusionGradientDirectionSequence", None)
    holder = gradient[0] if gradient else item  # Canon/Toshiba put it at the top level
    vector = _numbers(holder.get("DiffusionGradientOrientation", None), "d")
    if len(vector) == 3 and np.linalg.norm(vector) > 1e-6:
        if directionality:
            # The declared directionality decides; the vector only says which way.
            if evidence.direction is None:
                u = np.asarray(vector) / np.linalg.norm(vector)
                evidence.direction = (float(u[0]), float(u[1]), float(u[2]))
        else:
            evidence.add_direction(f"DiffusionGradientOrientation (0018,9089){where}", vector)


def _siemens_evidence(ds: Dataset, evidence: _Evidence) -> None:
    csa = csa_image_header(ds)
    b = _numbers(csa_value(csa, "B_value"))
    if b:
        evidence.b_values.append(("Siemens CSA B_value", b[0]))
    evidence.add_direction("Siemens CSA DiffusionGradientDirection",
                           _as_list(csa_vector(csa, "DiffusionGradientDirection", 3)))
    csa_directionality = _text(csa_value(csa, "DiffusionDirectionality")).upper()
    if csa_directionality in ("DIRECTIONAL", "BMATRIX"):
        evidence.directional.append("Siemens CSA DiffusionDirectionality")
    elif csa_directionality in ("ISOTROPIC", "NONE"):
        evidence.trace.append("Siemens CSA DiffusionDirectionality")

    b = _numbers(private_element_value(ds, 0x0019, "SIEMENS MR HEADER", 0x0C))
    if b:
        evidence.b_values.append(("Siemens (0019,xx0C) B_value", b[0]))
    directionality = _text(private_element_value(ds, 0x0019, "SIEMENS MR HEADER", 0x0D)).upper()
    if directionality in ("DIRECTIONAL", "BMATRIX"):
        evidence.directional.append("Siemens (0019,xx0D)")
    elif directionality in ("ISOTROPIC", "NONE"):
        evidence.trace.append("Siemens (0019,xx0D)")
    evidence.add_direction(
        "Siemens (0019,xx0E)",
        _numbers(private_element_value(ds, 0x0019, "SIEMENS MR HEADER", 0x0E), "d") or None,
    )


def _siemens_sequence_name_evidence(ds: Dataset, evidence: _Evidence) -> None:
    """SequenceName like ``*ep_b1000t`` (trace) or ``*ep_b1000#2`` (direction 2)."""
    match = _SEQUENCE_NAME_B.search(_text(ds.get("SequenceName", None)))
    if match:
        evidence.weak_b_values.append(("Siemens SequenceName", float(match.group(1))))
        if match.group(2):
            evidence.weak_trace.append("Siemens SequenceName suffix 't'")
        elif match.group(3):
            evidence.weak_directional.append("Siemens SequenceName suffix '#n'")


def _ge_evidence(ds: Dataset, evidence: _Evidence) -> None:
    values = _numbers(private_element_value(ds, 0x0043, "GEMS_PARM_01", 0x39))
    if values:
        raw = int(round(values[0]))
        evidence.b_values.append(("GE (0043,xx39)[0] mod 1e9", float(raw % GE_B_VALUE_MODULUS)))
    n_directions = _numbers(private_element_value(ds, 0x0019, "GEMS_ACQU_01", 0xE0))
    gradient = [
        _numbers(private_element_value(ds, 0x0019, "GEMS_ACQU_01", offset))
        for offset in (0xBB, 0xBC, 0xBD)
    ]
    if n_directions and n_directions[0] == 0:
        evidence.trace.append("GE (0019,xxE0) = 0")
    elif n_directions and all(len(g) == 1 for g in gradient):
        evidence.add_direction("GE (0019,xxBB-BD)", [g[0] for g in gradient])


def _philips_evidence(item: Dataset, evidence: _Evidence) -> None:
    b = _numbers(private_element_value(item, 0x2001, "Philips Imaging DD 001", 0x03), "f")
    if b:
        evidence.b_values.append(("Philips (2001,xx03)", b[0]))
    direction = _text(private_element_value(item, 0x2001, "Philips Imaging DD 001", 0x04)).upper()
    if direction == "I":
        evidence.trace.append("Philips (2001,xx04) 'I'")
    elif direction in ("P", "M", "S", "O", "R"):
        evidence.directional.append(f"Philips (2001,xx04) '{direction}'")
    gradient = [
        _numbers(private_element_value(item, 0x2005, "Philips MR Imaging DD 001", offset), "f")
        for offset in (0xB0, 0xB1, 0xB2)
    ]
    if all(len(g) == 1 for g in gradient) and direction != "I":
        evidence.add_direction("Philips (2005,xxB0-B2)", [g[0] for g in gradient])


def _canon_evidence(ds: Dataset, evidence: _Evidence) -> None:
    match = _CANON_COMMENT_B.match(_text(ds.get("ImageComments", None)))
    if not match:
        return
    evidence.b_values.append(("Canon ImageComments 'b=...'", float(match.group(1))))
    inside = match.group(2)
    if inside:
        vector = _numbers(inside.replace(",", "\\"))
        if len(vector) == 3:
            evidence.add_direction("Canon ImageComments direction", vector)


#: UIH private elements (as dcm2niix reads them): b-value, gradient direction.
UIH_B_VALUE = (0x0065, 0x1009)
UIH_GRADIENT = (0x0065, 0x1037)


def _uih_evidence(ds: Dataset, evidence: _Evidence) -> None:
    elem = ds.get(UIH_B_VALUE)
    b = _numbers(None if elem is None else elem.value, "d")
    if b:
        evidence.b_values.append(("UIH (0065,1009)", b[0]))
    elem = ds.get(UIH_GRADIENT)
    vector = _numbers(None if elem is None else elem.value, "d")
    if len(vector) == 3:
        evidence.add_direction("UIH (0065,1037)", vector)


def _as_list(vector: np.ndarray | None) -> list[float] | None:
    return None if vector is None else [float(v) for v in vector]


# --------------------------------------------------------------------------
# Decisions


def _decide(tokens: tuple[str, ...], evidence: _Evidence) -> ImageClass:
    """Turn collected evidence into a verdict (shared by classic and enhanced)."""
    derived = sorted(set(tokens) & DERIVED_MAP_TOKENS)
    if derived:
        return ImageClass(ImageRole.OTHER, reason=f"derived map ({'/'.join(derived)}), ignored")
    if "ADC" in tokens:
        return ImageClass(ImageRole.ADC)
    evidence.settle(tokens)
    if not evidence.b_values:
        return ImageClass(ImageRole.OTHER, reason=NO_B_VALUE)
    source, b_value = evidence.b_values[0]
    for other_source, other in evidence.b_values[1:]:
        if abs(other - b_value) > B_VALUE_TOLERANCE:
            return ImageClass(
                ImageRole.OTHER,
                reason=f"conflicting b-values: {source} = {b_value:g}, {other_source} = {other:g}",
            )
    if b_value < 0:
        return ImageClass(ImageRole.OTHER, reason=f"negative b-value in {source}")
    if b_value < B_VALUE_TOLERANCE:
        return ImageClass(ImageRole.B0, 0.0, source)
    if evidence.directional and evidence.trace:
        return ImageClass(
            ImageRole.OTHER,
            b_value,
            source,
            reason=(
                f"conflicting directionality: {evidence.directional[0]} says directional, "
                f"{evidence.trace[0]} says trace"
            ),
        )
    if evidence.directional:
        return ImageClass(ImageRole.DIRECTIONAL, b_value, source, evidence.direction)
    reason = "" if evidence.trace else "no directionality marker; taken as trace"
    return ImageClass(ImageRole.DWI, b_value, source, reason=reason)


def classify_image(ds: Dataset) -> ImageClass:
    """Classify a classic (single-frame or MOSAIC) MR image from its header alone."""
    tokens = _image_type(ds)
    evidence = _Evidence([], [], [])
    _standard_evidence(ds, evidence, "")
    vendor = vendor_of(ds)
    # Private creators identify their owner, so private elements are read
    # whatever Manufacturer says; free-text conventions only for their vendor.
    _siemens_evidence(ds, evidence)
    _ge_evidence(ds, evidence)
    _philips_evidence(ds, evidence)
    if "TRACEW" in tokens:
        evidence.weak_trace.append("ImageType TRACEW")
    if vendor is Vendor.SIEMENS:
        _siemens_sequence_name_evidence(ds, evidence)
    if vendor is Vendor.CANON:
        _canon_evidence(ds, evidence)
    if vendor is Vendor.UIH:
        _uih_evidence(ds, evidence)
    return _decide(tokens, evidence)


def _philips_private_frame_item(ds: Dataset, frame_index: int) -> Dataset | None:
    """Philips' private per-frame sequence (2005,xx0F) "Philips MR Imaging DD 005"."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    if per_frame is None or frame_index >= len(per_frame):
        return None
    value = private_element_value(per_frame[frame_index], 0x2005, "Philips MR Imaging DD 005", 0x0F)
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        items = list(value)
        if items and isinstance(items[0], Dataset):
            return items[0]
    return None


def frame_type_tokens(ds: Dataset, frame_index: int) -> tuple[str, ...]:
    """FrameType of one frame (MR Image Frame Type), else the object's ImageType."""
    item = functional_group_item(ds, frame_index, "MRImageFrameTypeSequence")
    if item is not None and "FrameType" in item:
        return image_type_tokens(item.FrameType)
    return _image_type(ds)


def classify_frame(ds: Dataset, frame_index: int) -> ImageClass:
    """Classify frame ``frame_index`` (0-based) of an Enhanced MR multi-frame object.

    Only frame-level sources count (MRDiffusionSequence, Philips' private
    per-frame sequence): top-level vendor elements of a multi-frame object
    describe no particular frame.
    """
    tokens = frame_type_tokens(ds, frame_index)
    evidence = _Evidence([], [], [])
    diffusion = functional_group_item(ds, frame_index, "MRDiffusionSequence")
    if diffusion is not None:
        _standard_evidence(diffusion, evidence, " in MRDiffusionSequence")
    private = _philips_private_frame_item(ds, frame_index)
    if private is not None:
        _standard_evidence(private, evidence, " in Philips (2005,xx0F)")
        _philips_evidence(private, evidence)
    return _decide(tokens, evidence)


def with_role(cls: ImageClass, role: ImageRole, *, b_value: float | None, source: str,
              reason: str = "") -> ImageClass:
    """A copy of ``cls`` with another role (series-level conventions)."""
    return replace(cls, role=role, b_value=b_value, b_value_source=source, reason=reason)
