"""The one exception tree of strokeseg.

Retry policy is a type check: a :class:`RetriableError` may succeed if the same
work is tried again later (a PACS that is down, a database that is busy), a
:class:`PermanentError` never will (the input itself is unusable).  Every
:class:`StudyRefused` carries a short ``reason`` an operator can act on; it is
stored on the job, printed by ``strokeseg segment`` and logged.  Reasons never
contain patient names or IDs.

::

    StrokesegError
    ├── ConfigError
    ├── RetriableError
    │   └── DeliveryError
    └── PermanentError
        ├── ModelError
        └── StudyRefused
            ├── NoDiffusionSeries
            ├── NoHighBValue
            ├── MissingADC
            ├── GeometryError
            ├── IncompleteStudy
            └── UnreadableImage
"""

from __future__ import annotations


class StrokesegError(Exception):
    """Base of every error raised on purpose by strokeseg."""


class ConfigError(StrokesegError):
    """The configuration is invalid or incomplete."""


class RetriableError(StrokesegError):
    """Trying again later may succeed."""


class DeliveryError(RetriableError):
    """A result object could not be delivered to a destination."""


class PermanentError(StrokesegError):
    """Trying again will fail the same way."""


class ModelError(PermanentError):
    """The model files or model card are missing, corrupt or inconsistent."""


class StudyRefused(PermanentError):
    """The study cannot be processed; ``reason`` says why, in operator words."""

    default_reason = "study refused"

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason or self.default_reason
        super().__init__(self.reason)


class NoDiffusionSeries(StudyRefused):
    default_reason = "no diffusion series"


class NoHighBValue(StudyRefused):
    default_reason = "no high-b (>= 500 s/mm2) diffusion images"


class MissingADC(StudyRefused):
    default_reason = "no ADC map and no b0 images to compute one"


class GeometryError(StudyRefused):
    default_reason = "inconsistent image geometry"


class IncompleteStudy(StudyRefused):
    """Part of the study never arrived (a cut transfer, an ADC of fewer slices).

    Never filled in: a missing slice is not a slice without lesion.
    """

    default_reason = "study incomplete"


class UnreadableImage(StudyRefused):
    default_reason = "unreadable pixel data"
