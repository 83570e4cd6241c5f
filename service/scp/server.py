"""The DICOM SCP: C-ECHO and C-STORE of MR images into the durable spool.

Handlers never raise and never run inference: they write the received bytes
to the spool (fsync'd), record the instance in the database, and only then
answer Success.  Anything that prevents that answers a failure status, so the
sender keeps its copy and can retry.

Durability is per instance, not grouped: a sender waits for each C-STORE's answer before it
sends the next image on the association (storescu, scanners and PACS do), so there is no
batch to group, and an answer held back for a batch would only add its wait to every image.
What keeps the receive fast is the work around the fsyncs (file, then folder entry): the received
bytes are written as they came with a header built directly (no decode and re-encode), one
transaction records the instance (and returns where a re-sent one was stored before), and the
instance's signature is read from the header elements pynetdicom already decoded. On the
embedded SQLite that transaction goes through the driver and its commit does not wait for the
disk: the file is the record, and the receiver records at start any file whose row a power
loss took back (:func:`service.recovery.record_unrecorded_instances`). An I/O thread to overlap
the file's fsync with the statements was measured and was slower (the GIL hand-offs cost more
than the overlap saved); decoding only the header (stopping before the pixel data) was slower
too (pydicom calls the stop test on every element).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedMRImageStorage,
    MRImageStorage,
    Verification,
)

from service import metrics
from service.commitment_reports import add_storage_commitment
from service.config import ScpTlsSettings
from service.db import JobStore, ReceivedInstance
from service.db.commitment import CommitmentStore
from service.domain import InstanceSignature
from service.storage import Spool
from service.tls import server_context

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = (MRImageStorage, EnhancedMRImageStorage)

# C-STORE status codes (PS3.4 Annex B.2.3, GG.4).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000


Describe = Callable[[Dataset], InstanceSignature]

# PS3.5 9.1: digits and dots, at most 64 characters. Leading zeros in a component are
# not conformant either, but some scanners write them and they do no harm here.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
MAX_UID_LENGTH = 64


def uid_problem(name: str, value: str) -> str | None:
    """Why ``value`` is not a usable UID (PS3.5 9.1), or None when it is.

    UIDs become folder names in the spool and keys in the database, so a UID that is
    not one is refused the same way on every backend: 0xC000 "cannot understand",
    which tells the sender not to retry the same bytes.
    """
    if not value:
        return f"{name} is empty"
    if len(value) > MAX_UID_LENGTH:
        return f"{name} is {len(value)} characters long (at most {MAX_UID_LENGTH})"
    if not _UID.fullmatch(value):
        return f"{name} has characters other than digits and dots"
    return None


class ReceivingStudies:
    """Which study each open association is delivering now, so completion waits for it.

    A sender stalls mid-study under load (a busy scanner host, many associations on
    few cores) for longer than the idle timeout; closing the study then would process
    part of it and turn the rest into a second, refused job. So the study an open
    association last stored an image of counts as still arriving, until the association
    closes, moves on to another study, or stores nothing for the hold time (a sender that
    keeps an idle association open cannot hold a study forever). Thread-safe: C-STOREs
    note from the association threads, the completion scheduler reads.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[int, tuple[str, float]] = {}  # association -> (study UID, when)

    def stored(self, association: int, study_instance_uid: str) -> None:
        """An image of ``study_instance_uid`` was stored on ``association``."""
        with self._lock:
            self._latest[association] = (study_instance_uid, self._clock())

    def closed(self, association: int) -> None:
        with self._lock:
            self._latest.pop(association, None)

    def studies(self, hold_s: float) -> set[str]:
        """Studies an open association stored its latest image of within ``hold_s``."""
        cutoff = self._clock() - hold_s
        with self._lock:
            return {study for study, when in self._latest.values() if when >= cutoff}


@dataclass
class StoreHandler:
    """Persist one C-STORE request; returns a status code, never raises."""

    spool: Spool
    store: JobStore
    describe: Describe | None = None  # header-only signature for content-aware completion
    min_free_bytes: int = 0  # refuse (0xA700) a store that would leave less free space than this
    receiving: ReceivingStudies | None = None  # which study each open association is sending

    def __call__(self, event: Any) -> int:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            ds: Dataset = event.dataset
            study_uid = str(ds.StudyInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
            sop_uid = str(ds.SOPInstanceUID)
        except Exception as exc:  # a dataset pydicom cannot decode
            log.warning(
                "C-STORE from %s refused: cannot parse dataset (%s)", calling_ae, type(exc).__name__
            )
            metrics.STORE_FAILURES.labels(status=hex(CANNOT_UNDERSTAND)).inc()
            return CANNOT_UNDERSTAND
        problems = [
            problem
            for problem in (
                uid_problem("StudyInstanceUID", study_uid),
                uid_problem("SeriesInstanceUID", series_uid),
                uid_problem("SOPInstanceUID", sop_uid),
            )
            if problem
        ]
        if problems:
            log.warning("C-STORE from %s refused: %s", calling_ae, "; ".join(problems))
            metrics.STORE_FAILURES.labels(status=hex(CANNOT_UNDERSTAND)).inc()
            return CANNOT_UNDERSTAND
        request_sop = str(event.request.AffectedSOPInstanceUID)
        if sop_uid != request_sop:
            log.warning(
                "C-STORE from %s refused: dataset UIDs do not match the request", calling_ae
            )
            metrics.STORE_FAILURES.labels(status=hex(DATASET_DOES_NOT_MATCH_SOP_CLASS)).inc()
            return DATASET_DOES_NOT_MATCH_SOP_CLASS
        try:
            data = part10_bytes(event)
            short = self._short_of_space(len(data))
            if short:
                log.error("C-STORE from %s refused: %s", calling_ae, short)
                metrics.STORE_FAILURES.labels(status=hex(OUT_OF_RESOURCES)).inc()
                return OUT_OF_RESOURCES
            target = self.spool.instance_path(study_uid, series_uid, sop_uid)
            new_file = not target.exists()
            path = self.spool.store_instance(study_uid, series_uid, sop_uid, data)  # durable first
            signature = self.describe(ds) if self.describe is not None else None
            try:
                recorded = self.store.record_received(ReceivedInstance(
                    study_uid, series_uid, sop_uid, str(event.request.AffectedSOPClassUID), str(path),
                    len(data), calling_ae, signature))
            except Exception:
                if new_file:  # not recorded: leave no orphan (the sender keeps its copy and retries)
                    path.unlink(missing_ok=True)
                raise
            if recorded.previous_path is not None and recorded.previous_path != str(path):
                # The same SOP Instance UID re-sent under another study or series: the record
                # moved to the new file, so the old one would be an orphan.
                Path(recorded.previous_path).unlink(missing_ok=True)
        except Exception:
            log.exception("C-STORE from %s could not be persisted; answering failure", calling_ae)
            metrics.STORE_FAILURES.labels(status=hex(OUT_OF_RESOURCES)).inc()
            return OUT_OF_RESOURCES
        if self.receiving is not None:
            self.receiving.stored(id(event.assoc), study_uid)
        metrics.INSTANCES_RECEIVED.labels(sop_class=str(event.request.AffectedSOPClassUID)).inc()
        metrics.INSTANCE_BYTES.inc(len(data))
        return SUCCESS

    def _short_of_space(self, size: int) -> str:
        """Why this store must wait for space ('' when there is room); reports the free space."""
        free = self.spool.free_bytes()
        if self.min_free_bytes and free - size < self.min_free_bytes:
            return (f"spool disk nearly full ({free / 2**20:.0f} MiB free, floor scp.min_free_mb "
                    f"{self.min_free_bytes / 2**20:.0f} MiB): free space or run `strokeseg gc`; "
                    "the sender keeps the image and may retry")
        return ""


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002 (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 2, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) as pynetdicom writes them.

    The same bytes as ``event.encoded_dataset()``'s header, built directly: pydicom's
    general encoder took longer than the rest of this header's work on the C-STORE path.
    """
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    rest = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _ui(sop_class_uid)),
        _meta_element(0x0003, b"UI", _ui(sop_instance_uid)),
        _meta_element(0x0010, b"UI", _ui(transfer_syntax_uid)),
        _meta_element(0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
        _meta_element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
    ))
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(rest))) + rest


def part10_bytes(event: Any) -> bytes:
    """The received dataset as a Part 10 file: our header + the received bytes, not re-encoded."""
    request = event.request
    header = file_meta_bytes(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                             str(event.context.transfer_syntax))
    received: bytes = request.DataSet.getvalue()
    return header + received


def handle_echo(event: Any) -> int:
    return SUCCESS


def build_ae(
    ae_title: str,
    *,
    allowed_calling_aets: list[str] | None = None,
    max_associations: int = 10,
    max_pdu_size: int = 0,
) -> AE:
    """An AE accepting Verification and MR storage, optionally only from listed callers."""
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = max_associations
    ae.maximum_pdu_size = max_pdu_size
    ae.require_called_aet = True
    if allowed_calling_aets:
        ae.require_calling_aet = list(allowed_calling_aets)
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class)
    return ae


class StorageSCP:
    """Runs the AE's server in background threads until :meth:`stop`."""

    def __init__(
        self,
        *,
        ae_title: str,
        host: str,
        port: int,
        spool: Spool,
        store: JobStore,
        allowed_calling_aets: list[str] | None = None,
        max_associations: int = 10,
        max_pdu_size: int = 0,
        commitments: CommitmentStore | None = None,
        describe: Describe | None = None,
        min_free_bytes: int = 0,
        allowed_networks: Sequence[str] = (),
        tls: ScpTlsSettings | None = None,
    ) -> None:
        self.ae = build_ae(
            ae_title,
            allowed_calling_aets=allowed_calling_aets,
            max_associations=max_associations,
            max_pdu_size=max_pdu_size,
        )
        self.address = (host, port)
        #: The study each open association is delivering (see :class:`ReceivingStudies`).
        self.receiving = ReceivingStudies()
        self.handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, StoreHandler(spool, store, describe, min_free_bytes, self.receiving)),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
        ]
        #: Accepted associations whose connection is still open (the active-associations gauge).
        #: Counted from the transport's close, which fires however the association ends
        #: (release, abort, network drop, our own time-out), so the gauge cannot drift.
        self._open_associations: set[int] = set()
        if commitments is not None:
            # Storage Commitment reports come back on a new association on which
            # the PACS proposes the SCP role; accept it and record the report.
            self.handlers.extend(add_storage_commitment(self.ae, commitments))
        self._server: Any = None
        self._tls_server: Any = None
        self.tls = tls if tls is not None and tls.enabled else None
        self._lock = threading.Lock()
        self._lock_open = threading.Lock()
        self.allowed_networks = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def _verify_peer(self, _request: Any, client_address: Any) -> bool:
        """The IP allow-list: a peer outside it is disconnected before any DICOM is read."""
        if not self.allowed_networks:
            return True
        try:
            address = ipaddress.ip_address(str(client_address[0]).split("%", 1)[0])
        except ValueError:
            address = None
        if address is not None and address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address is not None and any(address in network for network in self.allowed_networks):
            return True
        log.warning("connection from %s refused: address not in scp.allowed_networks", client_address[0])
        metrics.ASSOCIATIONS_REJECTED.labels(reason="address not allowed").inc()
        return False

    @staticmethod
    def _on_rejected(event: Any) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        log.warning("association from AE %s rejected", calling)
        metrics.ASSOCIATIONS_REJECTED.labels(reason="association rejected").inc()

    def _on_accepted(self, event: Any) -> None:
        with self._lock_open:
            self._open_associations.add(id(event.assoc))
            metrics.ACTIVE_ASSOCIATIONS.set(len(self._open_associations))

    def _on_connection_closed(self, event: Any) -> None:
        self.receiving.closed(id(event.assoc))
        with self._lock_open:
            self._open_associations.discard(id(event.assoc))
            metrics.ACTIVE_ASSOCIATIONS.set(len(self._open_associations))

    def start(self) -> None:
        """Listen on scp.port (unless TLS-only) and, with TLS on, on scp.tls.port."""
        with self._lock:
            if self.tls is None or self.tls.plain:
                self._server = self.ae.start_server(self.address, block=False, evt_handlers=self.handlers)
                self._server.verify_request = self._verify_peer
                log.info("DICOM SCP %s listening on %s:%d", self.ae.ae_title, *self._server.server_address[:2])
            if self.tls is not None:
                self._tls_server = self.ae.start_server(
                    (self.address[0], self.tls.port), block=False, evt_handlers=self.handlers,
                    ssl_context=server_context(self.tls, lazy_handshake=True),
                )
                self._tls_server.verify_request = self._verify_peer
                log.info("DICOM SCP %s listening with TLS on %s:%d",
                         self.ae.ae_title, *self._tls_server.server_address[:2])

    @property
    def port(self) -> int:
        """The plain listener's port (the TLS one's when TLS is the only one)."""
        server = self._server if self._server is not None else self._tls_server
        return int(server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        return None if self._tls_server is None else int(self._tls_server.server_address[1])

    def stop(self) -> None:
        with self._lock:
            for server in (self._server, self._tls_server):
                if server is not None:
                    server.shutdown()
            self._server = self._tls_server = None
