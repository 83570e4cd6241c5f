"""Deliver: C-STORE result objects to a destination AE, one association per destination.

An unreachable destination or a rejected association raises
:class:`~service.errors.DeliveryError` (retriable); per-object statuses come
back as :class:`StoreOutcome` so each is recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from service.config import Destination
from service.domain import ResultObject
from service.errors import ConfigError, DeliveryError
from service.tls import tls_args

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    obj: ResultObject
    status_code: int | None
    detail: str

    @property
    def stored(self) -> bool:
        # 0x0000 success; 0xB000, 0xB007, 0xB006 are warnings: the object was stored.
        return self.status_code is not None and (
            self.status_code == 0 or (self.status_code & 0xF000) == 0xB000
        )


def store_objects(
    destination: Destination,
    objects: Sequence[ResultObject],
    *,
    calling_ae_title: str,
    timeout_s: float = 30.0,
) -> list[StoreOutcome]:
    """C-STORE ``objects`` to ``destination``; raises DeliveryError if no association."""
    if not objects:
        return []
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.maximum_pdu_size = 0
    # Propose what we wrote (explicit VR little endian) and the one every SCP must
    # accept; never deflate or big endian, which some archives and validators mishandle.
    for sop_class in sorted({o.sop_class_uid for o in objects}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    try:
        secure = tls_args(destination)
    except ConfigError as exc:
        raise DeliveryError(f"destination {where}: TLS not usable: {exc}") from exc
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=secure)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "unreachable or aborted"
        raise DeliveryError(f"destination {where}: {reason}")
    outcomes: list[StoreOutcome] = []
    try:
        for obj in objects:
            try:
                status = assoc.send_c_store(dcmread(obj.path))
            except Exception as exc:  # network error mid-association
                outcomes.append(StoreOutcome(obj, None, f"send failed: {type(exc).__name__}: {exc}"))
                continue
            code = int(status.Status) if "Status" in status else None
            detail = "stored" if code == 0 else f"status 0x{code:04X}" if code is not None else (
                "no response (timeout or abort)"
            )
            outcomes.append(StoreOutcome(obj, code, detail))
    finally:
        if assoc.is_established:
            assoc.release()
    for outcome in outcomes:
        log.info("%s %s -> %s: %s", outcome.obj.kind, outcome.obj.sop_instance_uid, where, outcome.detail)
    return outcomes
