"""Which algorithm produced a result, in the forms DICOM wants it.

A SEG segment must name its algorithm (Algorithm Identification Sequence,
required when the Segment Algorithm Type is AUTOMATIC) and the TID 1500 report
should name it too (TID 4019 Algorithm Identification), so that a radiologist,
a registry or an auditor can tell which model version drew a lesion.  One
frozen :class:`AlgorithmInfo` feeds both, so the two objects can never
disagree about it.

The preprocessing profile the model card names (how DWI/ADC intensities were
normalised for this model) is part of the algorithm's identity: the same
weights behind another profile give other masks.  It is written as the
algorithm parameter ``preprocessing_profile=<name>`` in both the SEG's
AlgorithmParameters and the SR's TID 4019 "Algorithm Parameters" TEXT items.

The values end up in LO (64 characters, no backslash) and LT elements, and
highdicom 0.28 writes them without checking; we check here so that a bad model
card fails when the card is loaded, not when a DICOM validator or a PACS
rejects the object later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "AlgorithmInfo",
    "algorithm_identification_sequence",
    "sr_algorithm_identification",
]

log = logging.getLogger(__name__)

_LO_MAX = 64
_LT_MAX = 10240
_PROFILE_KEY = "preprocessing_profile"


def _check_lo(what: str, value: str, *, required: bool) -> None:
    """Reject values a DICOM LO element cannot hold (validators flag them)."""
    if required and not value.strip():
        raise ValueError(f"algorithm {what} must not be empty")
    if len(value) > _LO_MAX:
        raise ValueError(f"algorithm {what} is longer than {_LO_MAX} characters: {value!r}")
    if "\\" in value or any(ch in value for ch in "\r\n\f"):
        raise ValueError(f"algorithm {what} must not contain backslashes or line breaks")


@dataclass(frozen=True, slots=True)
class AlgorithmInfo:
    """Name, version and family of the model that produced a segmentation.

    ``parameters`` are written as ``key=value`` pairs joined by commas (that is
    how highdicom encodes AlgorithmParameters), so keys and values must not
    contain ``,`` or ``=``; otherwise a reader could not split them again.
    ``preprocessing_profile`` (the model card's profile name) is written as
    the last such pair, ``preprocessing_profile=<name>``.
    """

    name: str
    version: str
    family: Code | hd.sr.CodedConcept = codes.cid7162.ArtificialIntelligence
    source: str = "strokeseg"
    # A dict is unhashable: leave it out of the generated __hash__.
    parameters: dict[str, str] | None = field(default=None, hash=False)
    preprocessing_profile: str | None = None

    def __post_init__(self) -> None:
        _check_lo("name", self.name, required=True)
        _check_lo("version", self.version, required=True)
        _check_lo("source", self.source, required=False)
        if not isinstance(self.family, (Code, hd.sr.CodedConcept)):
            raise TypeError("algorithm family must be a pydicom Code or a highdicom CodedConcept")
        if self.parameters is not None:
            for key, value in self.parameters.items():
                for part in (key, value):
                    if not isinstance(part, str):
                        raise TypeError("algorithm parameters must map str to str")
                    if "," in part or "=" in part or "\\" in part:
                        raise ValueError(
                            f"algorithm parameter {key!r} must not contain ',', '=' or '\\'"
                        )
                if not key:
                    raise ValueError("algorithm parameter names must not be empty")
            # Copy so that a caller mutating its dict cannot change a frozen value.
            object.__setattr__(self, "parameters", dict(self.parameters))
            if _PROFILE_KEY in self.parameters:
                raise ValueError(
                    f"give the profile as preprocessing_profile, not as parameter {_PROFILE_KEY!r}"
                )
        if self.preprocessing_profile is not None:
            _check_lo("preprocessing profile", self.preprocessing_profile, required=True)
            if "," in self.preprocessing_profile or "=" in self.preprocessing_profile:
                raise ValueError("preprocessing profile must not contain ',' or '='")
        if len(self.parameters_text() or "") > _LT_MAX:
            raise ValueError(f"algorithm parameters exceed {_LT_MAX} characters")

    def all_parameters(self) -> dict[str, str]:
        """``parameters`` plus ``preprocessing_profile`` (last), as written to DICOM."""
        merged = dict(self.parameters or {})
        if self.preprocessing_profile is not None:
            merged[_PROFILE_KEY] = self.preprocessing_profile
        return merged

    def parameters_text(self) -> str | None:
        """AlgorithmParameters exactly as highdicom encodes it, or None."""
        merged = self.all_parameters()
        if not merged:
            return None
        return ",".join(f"{k}={v}" for k, v in merged.items())

    @property
    def family_code(self) -> hd.sr.CodedConcept:
        """The family as a highdicom CodedConcept (what both SEG and SR need)."""
        family = self.family
        if isinstance(family, hd.sr.CodedConcept):
            return family
        return hd.sr.CodedConcept(
            value=family.value,
            scheme_designator=family.scheme_designator,
            meaning=family.meaning,
            scheme_version=family.scheme_version,
        )


def algorithm_identification_sequence(info: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """The SEG segment's Algorithm Identification Sequence for ``info``.

    Empty parameter dicts are omitted rather than written as an empty LT,
    which some validators report as a zero-length type-1 value.
    """
    return hd.AlgorithmIdentificationSequence(
        name=info.name,
        family=info.family_code,
        version=info.version,
        source=info.source or None,
        parameters=info.all_parameters() or None,
    )


def sr_algorithm_identification(info: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """The same algorithm as an SR TID 4019 content group.

    TID 4019 stores each parameter as its own TEXT item; we write them in the
    same ``key=value`` form as the SEG so the two are trivially comparable.
    """
    params = [f"{k}={v}" for k, v in info.all_parameters().items()] or None
    return hd.sr.AlgorithmIdentification(
        name=info.name,
        version=info.version,
        parameters=params,
        family=info.family_code,
        manufacturer=info.source or None,
    )
