"""Coded concepts and equipment defaults that the SEG and the SR share.

Both objects describe the same finding; keeping its codes in one place means
a reader can join the SR's measurement group to the SEG's segment by code as
well as by UID.  Codes that pydicom's ``codes`` lacks (Infarct, millilitre)
are built here once.

Standard codes come first (SCT, DCM, LOINC, UCUM; each comment names where
it is listed).  Only where no standard concept exists do we use the private
coding scheme ``99STROKESEG`` (the ``99`` prefix is PS3.16's rule for local
designators); every SR declares it in its CodingSchemeIdentificationSequence
(highdicom passes ``coding_schemes=`` through to the SOP class), so a reader
can tell whose codes they are.  Private codes whose meaning contains a
parameter (a threshold, a cut-off) put the parameter in the code value too:
one code value never means two different things.

ADC unit: UCUM ``um2/s`` (1 um2/s = 1e-12 m2/s = 1e-6 mm2/s, exactly our
ADC unit).  DICOM CID 7181 also lists ``10-6.mm2/s``, but that string is not
valid UCUM (UCUM writes powers of ten as ``10*-6``); ``um2/s`` is.
"""

from __future__ import annotations

import importlib.metadata
import logging
import uuid

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes

__all__ = [
    "LESION_SEGMENT_NUMBER",
    "LESION_SEGMENT_LABEL",
    "LESION_TRACKING_ID",
    "LESION_CATEGORY",
    "INFARCT",
    "BRAIN",
    "VOLUME",
    "MILLILITER",
    "BRAIN_MRI",
    "PRESENCE_OF_PROPERTY",
    "PRESENT",
    "ABSENT",
    "DEFAULT_MANUFACTURER",
    "DEFAULT_SOFTWARE_VERSION",
    "DEFAULT_DEVICE_SERIAL_NUMBER",
    "stable_uid",
    "device_observer_uid",
    "PRIVATE_SCHEME",
    "private_code",
    "private_coding_scheme",
    "NUMBER_OF_LESIONS",
    "NO_UNITS",
    "APPARENT_DIFFUSION_COEFFICIENT",
    "UM2_PER_S",
    "MEAN",
    "SIZE_DESCRIPTOR",
    "SIZE_VALUES",
    "CENTER_OF_MASS",
    "IMAGE_QUALITY",
    "COMMENT",
    "YES",
    "NO",
    "CONNECTED_COMPONENTS_26",
    "MEAN_LESION_PROBABILITY",
    "SLICE_RANGE",
    "borderline_fraction_code",
    "adc_core_method_code",
    "core_volume_below_code",
    "DOMAIN_OF_VALIDITY",
    "WITHIN_VALIDATED_RANGE",
    "OUTSIDE_RANGE_REASON",
    "VALIDITY_NOTE",
    "VALIDITY_MEASURE",
    "DWI_MIMIC",
    "RELATIVE_ADC",
    "NOT_COUNTED_REASON",
]

log = logging.getLogger(__name__)

#: The lesion is always segment 1 of our SEG (BINARY segments start at 1).
LESION_SEGMENT_NUMBER = 1
LESION_SEGMENT_LABEL = "Acute ischemic lesion"
#: Human-readable tracking identifier shared by the SEG segment and the SR group.
LESION_TRACKING_ID = "Acute ischemic lesion"

#: SCT 49755003 "Morphologically Abnormal Structure" (segment category).
LESION_CATEGORY = hd.sr.CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure)
#: SCT 55641003 "Infarct" (segment type and SR finding type); not in pydicom's ``codes``.
INFARCT = hd.sr.CodedConcept("55641003", "SCT", "Infarct")
#: SCT 12738006 "Brain": the anatomic region of the segment.
BRAIN = hd.sr.CodedConcept.from_code(codes.SCT.Brain)
#: SCT 118565006 "Volume".
VOLUME = hd.sr.CodedConcept.from_code(codes.SCT.Volume)
#: UCUM millilitre; pydicom's UCUM codes only offer mm3.
MILLILITER = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
#: LOINC 24590-2, as listed in DICOM CID 646 ("Brain MRI"): the procedure reported.
BRAIN_MRI = hd.sr.CodedConcept.from_code(codes.LN.BrainMRI)
#: DCM 121052 "Presence of property" with DCM 121053/121054 "Present"/"Absent".
PRESENCE_OF_PROPERTY = hd.sr.CodedConcept.from_code(codes.DCM.PresenceOfProperty)
PRESENT = hd.sr.CodedConcept.from_code(codes.DCM.Present)
ABSENT = hd.sr.CodedConcept.from_code(codes.DCM.Absent)

#: SCT 246206008 "Number of lesions" (observable entity).
NUMBER_OF_LESIONS = hd.sr.CodedConcept("246206008", "SCT", "Number of lesions")
#: UCUM "1" (CID 7181): a count has no unit.
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
#: DCM 113041 (CID 218/7180).
APPARENT_DIFFUSION_COEFFICIENT = hd.sr.CodedConcept.from_code(
    codes.DCM.ApparentDiffusionCoefficient
)
#: UCUM um2/s (CID 7181/7277) = 1e-6 mm2/s; see the module docstring.
UM2_PER_S = hd.sr.CodedConcept("um2/s", "UCUM", "um2/s")
#: SCT 373098007 "Mean" (CID 7464, as the measurement's Derivation).
MEAN = hd.sr.CodedConcept("373098007", "SCT", "Mean")
#: DCM 112025 "Size Descriptor" with CID 252 "S-M-L Size Descriptor" values.
SIZE_DESCRIPTOR = hd.sr.CodedConcept("112025", "DCM", "Size Descriptor")
SIZE_VALUES: dict[str, hd.sr.CodedConcept] = {
    "small": hd.sr.CodedConcept("255507004", "SCT", "Small"),
    "medium": hd.sr.CodedConcept("255508009", "SCT", "Medium"),
    "large": hd.sr.CodedConcept("255509001", "SCT", "Large"),
}
#: DCM 128138 "Center of Mass" (CID 219): the geometric purpose of a lesion's point ROI.
CENTER_OF_MASS = hd.sr.CodedConcept("128138", "DCM", "Center of Mass")
#: DCM 111101 "Image Quality": concept name of the input-quality text.
IMAGE_QUALITY = hd.sr.CodedConcept("111101", "DCM", "Image Quality")
#: DCM 121106 "Comment".
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
#: SCT 373066001 / 373067005 (CID 230 "Yes-No").
YES = hd.sr.CodedConcept("373066001", "SCT", "Yes")
NO = hd.sr.CodedConcept("373067005", "SCT", "No")

#: Our private coding scheme designator (see the module docstring).
PRIVATE_SCHEME = "99STROKESEG"
_SH_MAX, _LO_MAX = 16, 64


def private_code(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the ``99STROKESEG`` scheme; value <= 16 and meaning <= 64 characters."""
    if not value or len(value) > _SH_MAX or not meaning or len(meaning) > _LO_MAX:
        raise ValueError(f"private code {value!r} / {meaning!r} does not fit SH/LO")
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, meaning)


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """The CodingSchemeIdentificationSequence item that declares ``99STROKESEG``."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="strokeseg local codes",
        responsible_organization="strokeseg",
    )


#: Measurement method of the lesion count.
CONNECTED_COMPONENTS_26 = private_code("CC3D26", "3-D connected components, 26-connectivity")
#: Mean of the model's probability over the lesion voxels.
MEAN_LESION_PROBABILITY = private_code("MEANPROB", "Mean lesion probability")
#: Text: a lesion's slices as InstanceNumbers and indices.
SLICE_RANGE = private_code("SLICERANGE", "Slice range")

# Domain of validity (see service.assess.validity).  No standard concept says
# "this algorithm's result lies inside the range it was validated on", so the
# statement is a private Yes/No question (value SCT Yes/No, like the core-volume
# comparisons) with the reasons, notes and checked measures as TEXT.
#: Text: the one-line statement ("within the model's validated range" / "OUTSIDE ...").
DOMAIN_OF_VALIDITY = private_code("VALIDITY", "Domain of validity")
#: Yes/No: is the result inside the algorithm's validated range?
WITHIN_VALIDATED_RANGE = private_code("WITHINRANGE", "Result within the algorithm's validated range")
#: Text, one item per reason the result is outside the validated range.
OUTSIDE_RANGE_REASON = private_code("RANGEREASON", "Reason the result is outside the validated range")
#: Text: a fact that does not put the result outside the range (b-value harmonisation,
#: calibrated ADC core threshold).
VALIDITY_NOTE = private_code("VALIDITYNOTE", "Domain of validity note")
#: Text "name=value": a measure of the input checked against the validated range.
VALIDITY_MEASURE = private_code("VALIDITYMEASURE", "Measure checked against the validated range")

# Components the restricted-diffusion guard set aside (service.assess.guard): bright
# on DWI but not dark on ADC (T2 shine-through, subacute/chronic lesion, artefact).
# SCT has no concept for "DWI hyperintensity without restricted diffusion" and none
# for a relative ADC, hence private codes.  The finding type is deliberately not
# Infarct, so no reader adds these to the lesion.
#: Finding type of a set-aside component.
DWI_MIMIC = private_code("DWIMIMIC", "DWI hyperintensity without restricted diffusion")
#: Mean ADC of a component / median ADC of normal-appearing brain (UCUM "1").
RELATIVE_ADC = private_code("RADC", "ADC relative to normal-appearing brain (rADC)")
#: Text: why a component is not counted as lesion.
NOT_COUNTED_REASON = private_code("NOTCOUNTED", "Reason not counted as lesion")


def _num(value: float) -> str:
    """``value`` for a code value: shortest form, '.' kept (21 -> '21', 0.3 -> '0.3')."""
    return f"{value:g}"


def borderline_fraction_code(low: float, high: float) -> hd.sr.CodedConcept:
    """Fraction of voxels with probability in [low, high] among those >= low."""
    return private_code(
        f"BORDER{_num(low)}-{_num(high)}",
        f"Fraction of voxels with probability {_num(low)}-{_num(high)} among >= {_num(low)}",
    )


def adc_core_method_code(threshold: float) -> hd.sr.CodedConcept:
    """Method of the ADC-core volume: ADC below ``threshold`` um2/s in the brain."""
    return private_code(
        f"ADCLT{_num(threshold)}", f"ADC below {_num(threshold)} um2/s within the brain mask"
    )


def core_volume_below_code(cutoff_ml: float) -> hd.sr.CodedConcept:
    """Yes/No question: is the ADC-core volume below ``cutoff_ml``?"""
    return private_code(
        f"CORELT{_num(cutoff_ml)}",
        f"ADC core volume below {_num(cutoff_ml)} mL (volume comparison only)",
    )


DEFAULT_MANUFACTURER = "strokeseg"
#: Used as the device serial number when the deployment does not configure one.
#: It should be set per installation (it identifies the device in audit trails).
DEFAULT_DEVICE_SERIAL_NUMBER = "strokeseg-0"


def _package_version() -> str:
    """Installed strokeseg version, so SoftwareVersions follows releases without edits."""
    try:
        return importlib.metadata.version("strokeseg")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source tree that was never installed (tests, dev).
        return "0+unknown"


DEFAULT_SOFTWARE_VERSION = _package_version()


#: Fixed namespace for :func:`stable_uid` (changing it changes every derived UID).
_UID_NAMESPACE = uuid.UUID("6f1c2a0e-5d0b-4c1e-9a51-3b7f0c2d9e47")


def stable_uid(*parts: str) -> str:
    """A UID that depends only on ``parts`` (a ``2.25.`` UUID-derived UID).

    Lets callers make re-sends idempotent: the same job key gives the same
    SeriesInstanceUID/SOPInstanceUID, so a PACS replaces rather than
    duplicates an object sent twice.
    """
    if not parts or any(not p for p in parts):
        raise ValueError("stable_uid needs one or more non-empty parts")
    # Not pydicom's generate_uid(prefix=None, entropy_srcs=...): with prefix=None
    # it ignores entropy_srcs and returns a random uuid4 UID.  A name-based
    # (SHA-1) UUID as a 2.25 OID is the ISO/IEC 9834-8 way to do this.
    name = "\x1f".join(("strokeseg", *parts))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def device_observer_uid(manufacturer: str, device_serial_number: str) -> str:
    """The SR Device Observer UID of this installation, stable across restarts."""
    return stable_uid("device-observer", manufacturer, device_serial_number)
