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
    │   ├── DeliveryError
    │   └── ResourceUnavailable
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

import errno
import os


class StrokesegError(Exception):
    """Base of every error raised on purpose by strokeseg."""


class ConfigError(StrokesegError):
    """The configuration is invalid or incomplete."""


class RetriableError(StrokesegError):
    """Trying again later may succeed."""


class DeliveryError(RetriableError):
    """A result object could not be delivered to a destination."""


class ResourceUnavailable(RetriableError):
    """Something the service needs is briefly unavailable: disk full, database locked or down,
    broker down. The job is tried again later, with backoff, instead of failing for good."""


#: OS errors that say "not now" rather than "never" (disk or quota full, out of file handles
#: or memory, a peer that is down).
TRANSIENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ENOMEM,
    errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
})
#: Other libraries' "not now" errors, by qualified name (this leaf imports none of them).
TRANSIENT_TYPES = frozenset({
    "sqlalchemy.exc.OperationalError",  # database locked, connection lost, server down
    "sqlalchemy.exc.TimeoutError",  # connection pool exhausted
    "sqlalchemy.exc.DisconnectionError",
    "kombu.exceptions.OperationalError",  # broker down
    "redis.exceptions.ConnectionError",
    "redis.exceptions.TimeoutError",
})


def as_strokeseg_error(exc: BaseException) -> StrokesegError | None:
    """``exc`` placed in this tree: itself, a :class:`ResourceUnavailable` for a known transient
    failure (also when it is the cause of ``exc``), or None for anything else (a bug: final)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StrokesegError):
            return current
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            return ResourceUnavailable(f"{os.strerror(current.errno)} (errno {errno.errorcode[current.errno]})")
        if isinstance(current, MemoryError):
            return ResourceUnavailable("out of memory")
        names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(current).__mro__}
        if names & TRANSIENT_TYPES:
            return ResourceUnavailable(f"{type(current).__name__}: {' '.join(str(current).split())[:200]}")
        current = current.__cause__ or current.__context__
    return None


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
