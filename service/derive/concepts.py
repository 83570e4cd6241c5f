"""Coded concepts and equipment defaults that the SEG and the SR share.

Both objects describe the same finding; keeping its codes in one place means
a reader can join the SR's measurement group to the SEG's segment by code as
well as by UID.  Codes that pydicom's ``codes`` lacks (Infarct, millilitre)
are built here once.
"""

from __future__ import annotations

import importlib.metadata
import logging
import uuid

import highdicom as hd
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
]

logger = logging.getLogger(__name__)

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
