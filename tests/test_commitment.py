"""Storage Commitment Push Model (SCU side) against a real Orthanc and scripted pynetdicom peers.

What is proven here, on real sockets:

* C-STORE then N-ACTION on one association, and N-ACTION on an association
  of its own; Orthanc answers on a NEW association to our SCP proposing the
  SCP role, our SCP accepts it, and the database shows the instances committed
  while Orthanc's REST API lists them;
* an instance Orthanc does not have is recorded failed with its Failure
  Reason, listed for re-send, and committed after re-send + re-request;
* a request nobody answers is flagged ``timed_out`` (Orthanc cannot reach the
  AE it would report to), and a late report still counts;
* a peer that reports on the same association is handled too; unknown
  transactions and malformed reports get a failure status, never an abort;
* the state lives in the database (SQLite and PostgreSQL) and survives a
  restart; the migration matches the models.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]

from service.commitment_reports import (
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_EVENT_TYPE,
    SUCCESS,
    add_storage_commitment,
    report_handlers,
)
from service.config import Destination
from service.db import Database, JobStore
from service.db.commitment import (
    CommitmentState,
    CommitmentStore,
    InstanceCommitState,
    failure_reason_text,
)
from service.db.models import Base
from service.db.session import alembic_config
from service.deliver import store_objects
from service.deliver.commitment import (
    STORAGE_COMMITMENT_INSTANCE_UID,
    CommitmentRequest,
    SOPReference,
    add_commitment_requested_context,
    new_transaction_uid,
    request_commitment,
    send_commitment_request,
)
from service.derive import AlgorithmInfo, DerivationSources, LesionMask, write_results
from service.domain import ResultObject
from service.scp import StorageSCP
from service.storage import Spool
from tests.conftest import free_port
from tests.dicom_factory import make_dwi_series, write_series
from tests.orthanc import Modality, Orthanc

OUR_AE = "STROKESEG"
#: Listed in Orthanc's DicomModalities at a port nobody listens on: its reports get lost.
LOST_AE = "STROKESEG_LOST"
NO_SUCH_OBJECT_INSTANCE = 0x0112
#: Generous: Orthanc reports within a fraction of a second on loopback.
REPORT_TIMEOUT_S = 10.0


# ------------------------------------------------------------------ module peers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("commitment")


@pytest.fixture(scope="module")
def scp_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def db(workdir: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{workdir / 'jobs.sqlite'}")
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def commitments(db: Database) -> CommitmentStore:
    return CommitmentStore(db)


class ReportClock:
    """When each transaction's report reached our handler (perf_counter), for latency."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}

    def wrap(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def timed(event: Any) -> Any:
            now = time.perf_counter()
            try:
                self.arrived.setdefault(str(event.event_information.TransactionUID), now)
            except Exception:
                pass
            return handler(event)

        return timed


@pytest.fixture(scope="module")
def report_clock() -> ReportClock:
    return ReportClock()


@pytest.fixture(scope="module")
def scp(
    workdir: Path, scp_port: int, db: Database, commitments: CommitmentStore, report_clock: ReportClock
) -> Iterator[StorageSCP]:
    """Our SCP built as the service builds it, plus the commitment context and handler."""
    server = StorageSCP(
        ae_title=OUR_AE,
        host="127.0.0.1",
        port=scp_port,
        spool=Spool(workdir / "spool"),
        store=JobStore(db),
    )
    handlers = add_storage_commitment(server.ae, commitments)
    server.handlers.extend((h[0], report_clock.wrap(h[1])) for h in handlers)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orthanc(workdir: Path, scp_port: int) -> Iterator[Orthanc]:
    modalities = [
        Modality("strokeseg", OUR_AE, scp_port),
        Modality("lost", LOST_AE, free_port()),
    ]
    with Orthanc(workdir / "orthanc", modalities=modalities) as server:
        yield server


@pytest.fixture(scope="module")
def destination(orthanc: Orthanc) -> Destination:
    return Destination(**orthanc.destination())


@pytest.fixture(scope="module")
def sources(workdir: Path) -> list[ResultObject]:
    """A small DWI series on disk, as ResultObjects (real MR objects to store)."""
    datasets = make_dwi_series(4, 32, 32)
    paths = write_series(datasets, workdir / "dwi")
    return [
        ResultObject("MR", p, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))
        for p, ds in zip(paths, datasets, strict=True)
    ]


@pytest.fixture(scope="module")
def results(workdir: Path, sources: list[ResultObject]) -> list[ResultObject]:
    """The SEG and SR the service would deliver for that series."""
    mask = np.zeros((4, 32, 32), dtype=bool)
    mask[1:3, 10:14, 12:16] = True
    volume_ml = float(mask.sum()) * 3.5 * 3.5 * 5.5 / 1000.0
    return write_results(
        DerivationSources.from_paths([s.path for s in sources]), LesionMask(mask, volume_ml), None,
        AlgorithmInfo("strokeseg-test", "0.1.0"), workdir / "results",
    )


def _new_job(db: Database) -> int:
    return JobStore(db).record_instance(
        study_instance_uid=f"{new_transaction_uid()}",
        series_instance_uid="1.2.3.4",
        sop_instance_uid=new_transaction_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        path="/dev/null",
        size_bytes=0,
        calling_ae_title="MRI1",
    )


def _extra_mr(workdir: Path, name: str) -> ResultObject:
    """An MR object written to disk but never sent anywhere."""
    (ds,) = make_dwi_series(1, 16, 16)
    (path,) = write_series([ds], workdir / name)
    return ResultObject("MR", path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))


# --------------------------------------------------------------- against Orthanc


@pytest.mark.network
def test_store_then_commit_on_one_association(
    scp: StorageSCP,
    orthanc: Orthanc,
    destination: Destination,
    db: Database,
    commitments: CommitmentStore,
    results: list[ResultObject],
    report_clock: ReportClock,
    record_property: Callable[[str, object], None],
) -> None:
    job_id = _new_job(db)
    request = CommitmentRequest.for_objects(results)
    uid = request.transaction_uid
    latency_count = {"destination": destination.name}
    observed_before = REGISTRY.get_sample_value("strokeseg_committed_latency_seconds_count", latency_count) or 0

    ae = AE(ae_title=OUR_AE)
    for sop_class in sorted({o.sop_class_uid for o in results}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    add_commitment_requested_context(ae)
    assoc = ae.associate(
        "127.0.0.1", destination.port, ae_title=destination.ae_title,
        evt_handlers=report_handlers(commitments),
    )
    assert assoc.is_established
    try:
        for obj in results:
            assert assoc.send_c_store(pydicom.dcmread(obj.path)).Status == 0
        commitments.record_request(
            uid, request.references, destination=destination.name,
            destination_ae_title=destination.ae_title, calling_ae_title=OUR_AE, job_id=job_id,
        )
        sent = time.perf_counter()
        action = send_commitment_request(
            assoc, request, wait_for_report_s=REPORT_TIMEOUT_S,
            report_arrived=lambda: commitments.is_reported(uid),
        )
    finally:
        assoc.release()
    commitments.record_action(uid, status_code=action.status_code, accepted=action.accepted)

    assert action.accepted and action.status_code == 0, action.detail
    assert action.report_seen  # Orthanc's report (on its own association) ended the wait
    summary = commitments.wait_for_report(uid, REPORT_TIMEOUT_S)
    assert summary is not None
    assert summary.state is CommitmentState.COMMITTED, summary.detail
    assert summary.reported_by == orthanc.ae_title
    assert summary.action_status == 0 and summary.job_id == job_id
    assert {i.sop_instance_uid: i.state for i in summary.instances} == {
        o.sop_instance_uid: InstanceCommitState.COMMITTED for o in results
    }
    assert [t.transaction_uid for t in commitments.transactions(job_id=job_id)] == [uid]
    stored = orthanc.sop_instance_uids()
    assert {o.sop_instance_uid for o in results} <= stored
    assert all(orthanc.has_instance(o.sop_instance_uid) for o in results)

    # The report that made the transaction committed was timed from the study's last image.
    assert REGISTRY.get_sample_value(
        "strokeseg_committed_latency_seconds_count", latency_count) == observed_before + 1

    latency = report_clock.arrived[uid] - sent
    record_property("n_action_to_n_event_report_s", round(latency, 3))
    print(
        f"\nOrthanc {orthanc.start_s:.2f} s to start; N-ACTION response {action.action_s:.3f} s, "
        f"N-ACTION -> N-EVENT-REPORT {latency:.3f} s"
    )
    assert latency < 5.0


@pytest.mark.network
def test_missing_instance_fails_then_resend_and_rerequest_commits(
    scp: StorageSCP,
    orthanc: Orthanc,
    destination: Destination,
    commitments: CommitmentStore,
    workdir: Path,
    sources: list[ResultObject],
) -> None:
    def commit(objects: list[ResultObject | SOPReference]) -> str:
        request = CommitmentRequest.for_objects(objects)
        commitments.record_request(
            request.transaction_uid, request.references, destination=destination.name,
            destination_ae_title=destination.ae_title, calling_ae_title=OUR_AE,
        )
        action = request_commitment(
            destination, request, calling_ae_title=OUR_AE, timeout_s=10,
            evt_handlers=report_handlers(commitments),
        )
        commitments.record_action(
            request.transaction_uid, status_code=action.status_code, accepted=action.accepted,
            detail=action.detail,
        )
        assert action.accepted, action.detail
        return request.transaction_uid

    stored, never_sent = sources[0], _extra_mr(workdir, "missing")
    assert all(o.stored for o in store_objects(destination, [stored], calling_ae_title=OUR_AE))
    assert not orthanc.has_instance(never_sent.sop_instance_uid)

    # Only the instance Orthanc lacks: the whole transaction fails, with the reason.
    lone = commit([never_sent])
    # Mixed: one committed, one failed.
    mixed_missing = _extra_mr(workdir, "missing2")
    mixed = commit([stored, mixed_missing])

    failed = commitments.wait_for_report(lone, REPORT_TIMEOUT_S)
    partial = commitments.wait_for_report(mixed, REPORT_TIMEOUT_S)
    assert failed is not None and partial is not None
    assert failed.state is CommitmentState.FAILED, failed.detail
    (item,) = failed.instances
    assert item.state is InstanceCommitState.FAILED
    assert item.failure_reason == NO_SUCH_OBJECT_INSTANCE
    assert item.failure_reason_text == failure_reason_text(NO_SUCH_OBJECT_INSTANCE)
    assert "no such object instance" in item.failure_reason_text
    assert partial.state is CommitmentState.PARTIALLY_FAILED, partial.detail
    states = {i.sop_instance_uid: (i.state, i.failure_reason) for i in partial.instances}
    assert states == {
        stored.sop_instance_uid: (InstanceCommitState.COMMITTED, None),
        mixed_missing.sop_instance_uid: (InstanceCommitState.FAILED, NO_SUCH_OBJECT_INSTANCE),
    }

    # The retry policy's view: exactly the two missing instances, with their files.
    todo = commitments.instances_to_resend(destination=destination.name)
    assert {t.sop_instance_uid for t in todo} == {
        never_sent.sop_instance_uid, mixed_missing.sop_instance_uid
    }
    assert {t.path for t in todo} == {str(never_sent.path), str(mixed_missing.path)}

    # Re-send from what the database says, re-request with a new transaction.
    resend = [
        ResultObject("MR", Path(t.path), t.sop_class_uid, t.sop_instance_uid, "") for t in todo
    ]
    assert all(o.stored for o in store_objects(destination, resend, calling_ae_title=OUR_AE))
    again = commit([SOPReference(t.sop_class_uid, t.sop_instance_uid, t.path) for t in todo])
    summary = commitments.wait_for_report(again, REPORT_TIMEOUT_S)
    assert summary is not None and summary.state is CommitmentState.COMMITTED, summary
    assert commitments.instances_to_resend(destination=destination.name) == []


@pytest.mark.network
def test_request_without_report_is_flagged_timed_out(
    scp: StorageSCP,
    orthanc: Orthanc,
    destination: Destination,
    commitments: CommitmentStore,
    results: list[ResultObject],
) -> None:
    # Orthanc accepts the N-ACTION from LOST_AE but cannot reach that AE to report.
    request = CommitmentRequest.for_objects(results)
    uid = request.transaction_uid
    commitments.record_request(uid, request.references, destination="orthanc-lost")
    action = request_commitment(destination, request, calling_ae_title=LOST_AE, timeout_s=10)
    assert action.accepted, action.detail
    commitments.record_action(uid, status_code=action.status_code, accepted=True)

    time.sleep(1.0)  # Orthanc's attempt to report fails within milliseconds on loopback
    assert not commitments.is_reported(uid)
    assert uid in commitments.flag_timed_out(older_than_s=0.5)
    assert uid not in commitments.flag_timed_out(older_than_s=0.5)  # flagged once
    summary = commitments.transaction(uid)
    assert summary is not None and summary.state is CommitmentState.TIMED_OUT
    assert summary.reported_at is None
    todo = commitments.instances_to_resend(destination="orthanc-lost")
    assert {t.sop_instance_uid for t in todo} == {o.sop_instance_uid for o in results}
    assert {t.transaction_state for t in todo} == {CommitmentState.TIMED_OUT}


# ------------------------------------------------------- scripted pynetdicom peers


class SameAssociationPACS:
    """A commitment SCP that sends the N-EVENT-REPORT back on the N-ACTION's association."""

    def __init__(self, *, fail: frozenset[str] = frozenset(), delay_s: float = 0.1) -> None:
        self.ae = AE(ae_title="SAMEASSOC")
        self.ae.add_supported_context(StorageCommitmentPushModel)
        self.fail = fail
        self.delay_s = delay_s
        self.report_status: list[int] = []
        self.port = free_port()
        self._server: Any = None

    def _on_action(self, event: Any) -> tuple[int, Dataset | None]:
        info = event.action_information
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in info.ReferencedSOPSequence]
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        ok, bad = [], []
        for cls, inst in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = inst
            if inst in self.fail:
                item.FailureReason = 0x0110
                bad.append(item)
            else:
                ok.append(item)
        report.ReferencedSOPSequence = ok
        if bad:
            report.FailedSOPSequence = bad
        assoc = event.assoc

        def send() -> None:
            time.sleep(self.delay_s)  # after our N-ACTION response has gone out
            status, _reply = assoc.send_n_event_report(
                report, 2 if bad else 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE_UID
            )
            self.report_status.append(int(status.Status) if "Status" in status else -1)

        threading.Thread(target=send, daemon=True).start()
        return 0x0000, None

    def __enter__(self) -> SameAssociationPACS:
        self._server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_N_ACTION, self._on_action)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()

    def destination(self) -> Destination:
        return Destination(name="same", ae_title="SAMEASSOC", host="127.0.0.1", port=self.port)


@pytest.mark.network
def test_report_on_the_same_association_is_recorded(commitments: CommitmentStore) -> None:
    refs = [SOPReference("1.2.840.10008.5.1.4.1.1.4", new_transaction_uid()) for _ in range(3)]
    with SameAssociationPACS(fail=frozenset({refs[2].sop_instance_uid})) as pacs:
        request = CommitmentRequest.for_objects(refs)
        uid = request.transaction_uid
        commitments.record_request(uid, request.references, destination="same")
        action = request_commitment(
            pacs.destination(), request, calling_ae_title=OUR_AE, timeout_s=10,
            evt_handlers=report_handlers(commitments), wait_for_report_s=REPORT_TIMEOUT_S,
            report_arrived=lambda: commitments.is_reported(uid),
        )
    assert action.accepted and action.report_seen, action
    assert pacs.report_status == [SUCCESS]
    summary = commitments.transaction(uid)
    assert summary is not None and summary.state is CommitmentState.PARTIALLY_FAILED
    assert summary.reported_by == "SAMEASSOC"
    assert [(i.state, i.failure_reason) for i in summary.instances] == [
        (InstanceCommitState.COMMITTED, None),
        (InstanceCommitState.COMMITTED, None),
        (InstanceCommitState.FAILED, 0x0110),
    ]


def _send_report(port: int, info: Dataset | None, event_type: int = 1) -> int:
    """Act as a PACS reporting on a NEW association, proposing the SCP role (as Orthanc does)."""
    ae = AE(ae_title="REPORTER")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title=OUR_AE,
        ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
    )
    assert assoc.is_established
    try:
        status, _reply = assoc.send_n_event_report(
            info if info is not None else Dataset(), event_type,
            StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE_UID,
        )
        return int(status.Status)
    finally:
        assoc.release()


@pytest.mark.network
def test_unknown_or_malformed_reports_are_answered_not_raised(
    scp: StorageSCP, commitments: CommitmentStore
) -> None:
    unknown = Dataset()
    unknown.TransactionUID = new_transaction_uid()
    unknown.ReferencedSOPSequence = []
    assert _send_report(scp.port, unknown) == INVALID_ARGUMENT_VALUE

    no_uid = Dataset()
    no_uid.ReferencedSOPSequence = []
    assert _send_report(scp.port, no_uid) == INVALID_ARGUMENT_VALUE

    broken_item = Dataset()
    broken_item.TransactionUID = new_transaction_uid()
    broken_item.ReferencedSOPSequence = [Dataset()]  # no UIDs in the item
    assert _send_report(scp.port, broken_item) == INVALID_ARGUMENT_VALUE
    assert _send_report(scp.port, unknown, event_type=3) == NO_SUCH_EVENT_TYPE

    # ...and the SCP still serves a good report and C-ECHO afterwards.
    ref = SOPReference("1.2.840.10008.5.1.4.1.1.4", new_transaction_uid())
    uid = new_transaction_uid()
    commitments.record_request(uid, [ref], destination="manual")
    good = Dataset()
    good.TransactionUID = uid
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    good.ReferencedSOPSequence = [item]
    assert _send_report(scp.port, good) == SUCCESS
    summary = commitments.transaction(uid)
    assert summary is not None and summary.state is CommitmentState.COMMITTED
    assert summary.reported_by == "REPORTER"
    echo = AE(ae_title="TESTER")
    echo.add_requested_context(Verification)
    assoc = echo.associate("127.0.0.1", scp.port, ae_title=OUR_AE)
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


@pytest.mark.network
def test_destination_that_cannot_commit_is_a_recorded_failure(
    commitments: CommitmentStore,
) -> None:
    # A peer without the Storage Commitment context, and a port nobody listens on.
    verification_only = AE(ae_title="NOCOMMIT")
    verification_only.add_supported_context(Verification)
    port = free_port()
    server = verification_only.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        cases = {
            "nocommit": Destination(name="nocommit", ae_title="NOCOMMIT", host="127.0.0.1", port=port),
            "down": Destination(name="down", ae_title="DOWN", host="127.0.0.1", port=free_port()),
        }
        for name, dest in cases.items():
            ref = SOPReference("1.2.840.10008.5.1.4.1.1.4", new_transaction_uid(), "/x.dcm")
            request = CommitmentRequest.for_objects([ref])
            commitments.record_request(request.transaction_uid, request.references, destination=name)
            action = request_commitment(dest, request, calling_ae_title=OUR_AE, timeout_s=5)
            assert not action.accepted and action.status_code is None
            commitments.record_action(
                request.transaction_uid, status_code=None, accepted=False, detail=action.detail
            )
            summary = commitments.transaction(request.transaction_uid)
            assert summary is not None and summary.state is CommitmentState.FAILED
            assert summary.detail == action.detail
            assert summary.instances[0].state is InstanceCommitState.FAILED
        assert "Storage Commitment" in commitments.transactions(destination="nocommit")[0].detail
        assert "unreachable" in commitments.transactions(destination="down")[0].detail
    finally:
        server.shutdown()


# ------------------------------------------------------------ the store itself


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url"))


def _refs(n: int) -> list[SOPReference]:
    return [SOPReference("1.2.840.10008.5.1.4.1.1.66.4", new_transaction_uid(), f"/r/{i}.dcm")
            for i in range(n)]


def test_state_survives_restart_and_a_late_report_counts(db_url: str) -> None:
    db = Database(db_url)
    refs = _refs(2)
    uid = new_transaction_uid()
    CommitmentStore(db).record_request(uid, refs, destination="pacs", destination_ae_title="PACS")
    time.sleep(0.05)
    assert CommitmentStore(db).flag_timed_out(older_than_s=0.01) == [uid]
    db.dispose()

    reopened = Database(db_url)  # a restarted process
    try:
        store = CommitmentStore(reopened)
        summary = store.transaction(uid)
        assert summary is not None and summary.state is CommitmentState.TIMED_OUT
        assert [i.state for i in summary.instances] == [InstanceCommitState.PENDING] * 2
        assert len(store.instances_to_resend(destination="pacs")) == 2
        outcome = store.apply_report(
            uid, committed=[(r.sop_class_uid, r.sop_instance_uid) for r in refs], failed=[],
            reported_by="PACS",
        )
        assert outcome is not None and outcome.state is CommitmentState.COMMITTED
        summary = store.transaction(uid)
        assert summary is not None and summary.state is CommitmentState.COMMITTED
        assert "late report" in summary.detail
        assert summary.report_latency_s is not None and summary.report_latency_s > 0
        assert store.instances_to_resend() == []
    finally:
        reopened.dispose()


def test_the_report_that_commits_carries_the_study_arrival_once(db_url: str) -> None:
    """The committed-latency clock: only the report that makes a transaction ``committed`` ends
    it (a peer re-sending its report must not count twice), timed from the study's last image."""
    db = Database(db_url)
    try:
        job_id = _new_job(db)
        summary = JobStore(db).job(job_id)
        assert summary is not None
        received = JobStore(db).last_received_at(summary.study_instance_uid)
        assert received is not None
        store = CommitmentStore(db)
        refs = _refs(2)
        committed = [(r.sop_class_uid, r.sop_instance_uid) for r in refs]
        partial, complete = new_transaction_uid(), new_transaction_uid()
        store.record_request(partial, refs, destination="pacs", job_id=job_id)
        first = store.apply_report(partial, committed=committed[:1], failed=[])
        assert first is not None and first.state is CommitmentState.PARTIALLY_FAILED
        assert first.newly_committed_study_received_at is None
        store.record_request(complete, refs, destination="pacs", job_id=job_id)
        outcome = store.apply_report(complete, committed=committed, failed=[])
        assert outcome is not None and outcome.destination == "pacs"
        assert outcome.newly_committed_study_received_at == received
        again = store.apply_report(complete, committed=committed, failed=[])
        assert again is not None and again.state is CommitmentState.COMMITTED
        assert again.newly_committed_study_received_at is None
    finally:
        db.dispose()


def test_report_is_the_final_word_on_its_transaction(db_url: str) -> None:
    db = Database(db_url)
    try:
        store = CommitmentStore(db)
        refs = _refs(3)
        uid = new_transaction_uid()
        store.record_request(uid, refs, destination="pacs")
        stranger = ("1.2.840.10008.5.1.4.1.1.4", new_transaction_uid())
        outcome = store.apply_report(
            uid,
            committed=[(refs[0].sop_class_uid, refs[0].sop_instance_uid), stranger],
            failed=[(refs[1].sop_class_uid, refs[1].sop_instance_uid, 0x0213)],
        )
        # refs[2] was not mentioned: failed without a reason; the stranger is ignored.
        assert outcome is not None
        assert (outcome.state, outcome.committed, outcome.failed, outcome.unmatched) == (
            CommitmentState.PARTIALLY_FAILED, 1, 2, 1,
        )
        assert store.apply_report(new_transaction_uid(), committed=[], failed=[]) is None
        # An N-ACTION answer arriving after the report does not undo it.
        store.record_action(uid, status_code=0, accepted=True)
        store.record_action(uid, status_code=0x0110, accepted=False, detail="late refusal")
        summary = store.transaction(uid)
        assert summary is not None and summary.state is CommitmentState.PARTIALLY_FAILED
        assert [(i.state, i.failure_reason) for i in summary.instances] == [
            (InstanceCommitState.COMMITTED, None),
            (InstanceCommitState.FAILED, 0x0213),
            (InstanceCommitState.FAILED, None),
        ]
        assert "resource limitation" in summary.instances[1].failure_reason_text
        # Re-send only considers the latest request per destination and instance.
        todo = store.instances_to_resend(destination="pacs")
        assert [t.sop_instance_uid for t in todo] == [refs[1].sop_instance_uid, refs[2].sop_instance_uid]
        retry = new_transaction_uid()
        store.record_request(retry, refs[1:], destination="pacs")
        assert store.instances_to_resend(destination="pacs") == []  # waiting for a report
        store.apply_report(
            retry, committed=[(r.sop_class_uid, r.sop_instance_uid) for r in refs[1:]], failed=[]
        )
        assert store.instances_to_resend(destination="pacs") == []
        store.record_request(new_transaction_uid(), refs[:1], destination="other")
        assert store.instances_to_resend(destination="other") == []
    finally:
        db.dispose()


def test_commitment_request_is_valid_by_construction() -> None:
    ref = SOPReference("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4")
    with pytest.raises(ValueError, match="at least one"):
        CommitmentRequest(new_transaction_uid(), ())
    with pytest.raises(ValueError, match="twice"):
        CommitmentRequest.for_objects([ref, ref])
    with pytest.raises(ValueError, match="not a valid UID"):
        SOPReference("1.2.840.10008.5.1.4.1.1.4", "1.2.03.x")
    with pytest.raises(ValueError, match="Transaction UID"):
        CommitmentRequest("", (ref,))
    request = CommitmentRequest.for_objects([ref], transaction_uid="2.25.1")
    info = request.action_information()
    assert info.TransactionUID == "2.25.1"
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence] == [
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4")
    ]
    assert new_transaction_uid() != new_transaction_uid()


def test_migration_creates_exactly_the_commitment_tables(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    try:
        tables = {"commitment_transactions", "commitment_instances"}

        def ours(diff: Any) -> bool:
            return any(tables & set(str(part) for part in _flatten(diff)))

        with db.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert [d for d in diffs if ours(d)] == []
        cfg = alembic_config()
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
        with db.engine.connect() as conn:
            names = set(conn.dialect.get_table_names(conn))
        assert not tables & names and "jobs" in names
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        with db.engine.connect() as conn:
            assert tables <= set(conn.dialect.get_table_names(conn))
    finally:
        db.dispose()


def _flatten(value: Any) -> Iterator[Any]:
    """Every table name mentioned in an alembic diff entry (tuples nest)."""
    if isinstance(value, tuple | list):
        for part in value:
            yield from _flatten(part)
    else:
        yield getattr(value, "name", value)
        table = getattr(value, "table", None)
        if table is not None:
            yield getattr(table, "name", table)
