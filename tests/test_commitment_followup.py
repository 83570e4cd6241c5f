"""Storage Commitment follow-up: re-send and re-request what a PACS did not commit.

What is proven here:

* against a real Orthanc, through the worker's own delivery code
  (``pipeline._deliver`` / ``_request_commitment``) and the study
  scheduler's follow-up lane: an instance deleted in Orthanc (REST) is
  reported failed (0x0112), recorded so, re-sent with the same SOP Instance
  UID, re-requested under a new Transaction UID (attempt 2, ``retry_of`` the
  first) and ends committed in our database and present in Orthanc;
* against a scripted pynetdicom PACS that keeps failing one instance: the
  attempts stop at ``delivery.commitment_max_attempts``, every attempt is a
  row, and the last one is closed ``gave_up`` with the peer's reason; one
  that fails only the first time commits at attempt 2;
* a follow-up interrupted between recording the re-request and sending it
  (a crash) is picked up by a new process: the unsent request times out and
  is re-requested again, within the same bound;
* the store's rules (backoff, one follow-up per transaction, superseded,
  nothing to re-send) on SQLite and PostgreSQL, and ``strokeseg jobs``
  showing committed / pending / failed with the reason per destination.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from service.commitment_reports import add_storage_commitment, report_handlers
from service.config import Destination, load_settings
from service.db import Database, JobStore
from service.db.commitment import (
    CommitmentState,
    CommitmentStore,
    DestinationState,
    FollowUp,
    InstanceCommitState,
)
from service.deliver import store_objects
from service.deliver.commitment import (
    STORAGE_COMMITMENT_INSTANCE_UID,
    CommitmentRequest,
    SOPReference,
    new_transaction_uid,
    request_commitment,
)
from service.deliver.followup import CommitmentFollowUp
from service.derive import AlgorithmInfo, DerivationSources, LesionMask, write_results
from service.domain import JobState, ResultObject
from service.pipeline import WorkerContext, _deliver, _request_commitment
from service.scheduler import Scheduler
from service.scp import StorageSCP
from service.storage import Spool
from tests.conftest import free_port
from tests.dicom_factory import make_dwi_series, write_series
from tests.orthanc import Modality, Orthanc
from tests.peers import run_cli, wait_for

OUR_AE = "STROKESEG"
NO_SUCH_OBJECT_INSTANCE = 0x0112
PROCESSING_FAILURE = 0x0110


# ----------------------------------------------------------------------- helpers


def _results(workdir: Path) -> tuple[list[Dataset], list[ResultObject]]:
    """A small DWI series and the SEG + SR the service writes for it."""
    series = make_dwi_series(4, 32, 32)
    paths = write_series(series, workdir / "dwi")
    mask = np.zeros((4, 32, 32), dtype=bool)
    mask[1:3, 10:14, 12:16] = True
    objects = write_results(
        DerivationSources.from_paths(paths), LesionMask(mask, float(mask.sum()) * 3.5 * 3.5 * 5.5 / 1000.0),
        None, AlgorithmInfo("strokeseg-test", "0.1.0"), workdir / "results",
    )
    return series, objects


def _job(store: JobStore, series: list[Dataset], state: JobState = JobState.DELIVERED) -> int:
    """A job for ``series``'s study, moved to ``state`` as a worker would."""
    ds = series[0]
    job_id = store.record_instance(
        study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
        path="/dev/null", size_bytes=1, calling_ae_title="MRI1",
    )
    store.queue(job_id)
    store.claim(job_id)
    if state is not JobState.RUNNING:
        store.transition(job_id, state)
    return job_id


def _our_scp(port: int, db: Database, spool: Path) -> StorageSCP:
    """Our SCP as ``strokeseg scp`` builds it, accepting commitment reports."""
    server = StorageSCP(ae_title=OUR_AE, host="127.0.0.1", port=port, spool=Spool(spool), store=JobStore(db))
    server.handlers.extend(add_storage_commitment(server.ae, CommitmentStore(db)))
    return server


class ScriptedPACS:
    """A Storage SCP + Storage Commitment SCP that fails chosen instances.

    ``fail_first[uid] = n`` reports ``uid`` failed (``reason``) in the first
    ``n`` commitment requests naming it, then committed; the report goes back
    on the N-ACTION's association.  ``stored`` counts the C-STOREs per SOP
    Instance UID.
    """

    def __init__(self, fail_first: dict[str, int], reason: int = PROCESSING_FAILURE) -> None:
        self.ae = AE(ae_title="SCRIPTED")
        self.ae.supported_contexts = StoragePresentationContexts
        self.ae.add_supported_context(StorageCommitmentPushModel)
        self.fail_first = dict(fail_first)
        self.reason = reason
        self.stored: Counter[str] = Counter()
        self.requests: list[list[str]] = []
        self.port = free_port()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        self.stored[str(event.request.AffectedSOPInstanceUID)] += 1
        return 0x0000

    def _on_action(self, event: Any) -> tuple[int, Dataset | None]:
        info = event.action_information
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        ok, bad = [], []
        uids = []
        for ref in info.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            uid = str(ref.ReferencedSOPInstanceUID)
            uids.append(uid)
            if self.fail_first.get(uid, 0) > 0:
                self.fail_first[uid] -= 1
                item.FailureReason = self.reason
                bad.append(item)
            else:
                ok.append(item)
        self.requests.append(uids)
        report.ReferencedSOPSequence = ok
        if bad:
            report.FailedSOPSequence = bad
        assoc = event.assoc

        def send() -> None:
            time.sleep(0.05)  # after our N-ACTION response has gone out
            assoc.send_n_event_report(
                report, 2 if bad else 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE_UID
            )

        threading.Thread(target=send, daemon=True).start()
        return 0x0000, None

    def __enter__(self) -> ScriptedPACS:
        self._server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()

    def destination(self, name: str = "scripted") -> Destination:
        return Destination(
            name=name, ae_title="SCRIPTED", host="127.0.0.1", port=self.port, storage_commitment=True
        )


def _commit(
    commitments: CommitmentStore, destination: Destination, objects: list[ResultObject], job_id: int | None
) -> str:
    """Attempt 1, as the worker makes it: record, N-ACTION (report on the same association), record."""
    request = CommitmentRequest.for_objects(objects)
    commitments.record_request(
        request.transaction_uid, request.references, destination=destination.name,
        destination_ae_title=destination.ae_title, calling_ae_title=OUR_AE, job_id=job_id,
    )
    action = request_commitment(
        destination, request, calling_ae_title=OUR_AE, timeout_s=10,
        evt_handlers=report_handlers(commitments), wait_for_report_s=5.0,
        report_arrived=lambda: commitments.is_reported(request.transaction_uid),
    )
    commitments.record_action(
        request.transaction_uid, status_code=action.status_code, accepted=action.accepted,
        detail=action.detail,
    )
    assert action.accepted, action.detail
    return request.transaction_uid


def _chain(commitments: CommitmentStore, destination: str) -> list[Any]:
    """The destination's transactions, oldest first."""
    return sorted(commitments.transactions(destination=destination), key=lambda t: t.attempt)


# --------------------------------------------------------------- against Orthanc


@pytest.mark.network
def test_instance_deleted_in_orthanc_is_resent_rerequested_and_committed(
    tmp_path: Path, record_property: Any
) -> None:
    port = free_port()
    database_url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    db = Database(database_url)
    scp = _our_scp(port, db, tmp_path / "spool")
    scp.start()
    try:
        with Orthanc(tmp_path / "orthanc", modalities=[Modality("strokeseg", OUR_AE, port)]) as pacs:
            destination = Destination(**pacs.destination("orthanc"), storage_commitment=True)
            settings = load_settings(
                spool_dir=tmp_path / "spool", database_url=database_url,
                scp={"ae_title": OUR_AE, "host": "127.0.0.1", "port": port},
                destinations=[destination.model_dump()],
                delivery={"retry_initial_s": 0.2, "commitment_max_attempts": 3},
            )
            ctx = WorkerContext.from_settings(settings)
            series, objects = _results(tmp_path)
            seg = next(o for o in objects if o.kind == "SEG")
            sr = next(o for o in objects if o.kind == "SR")
            job_id = _job(ctx.store, series, JobState.RUNNING)

            # The worker's delivery: C-STORE + commitment; Orthanc commits both.
            assert _deliver(ctx, job_id, objects) == []
            ctx.store.transition(job_id, JobState.DELIVERED)
            first = wait_for(
                lambda: [t for t in ctx.commitments.transactions(job_id=job_id) if t.state.is_reported],
                10, "Orthanc's first report",
            )[0]
            assert first.state is CommitmentState.COMMITTED

            # The PACS loses the SEG; the next commitment request finds it missing.
            pacs.delete_instance(seg.sop_instance_uid)
            assert not pacs.has_instance(seg.sop_instance_uid)
            _request_commitment(ctx, job_id, destination, [seg, sr])
            failed = wait_for(
                lambda: [
                    t for t in ctx.commitments.transactions(job_id=job_id)
                    if t.state is CommitmentState.PARTIALLY_FAILED
                ],
                10, "the report that the SEG is missing",
            )[0]
            reported = time.monotonic()
            states = {i.sop_instance_uid: (i.state, i.failure_reason) for i in failed.instances}
            assert states == {
                seg.sop_instance_uid: (InstanceCommitState.FAILED, NO_SUCH_OBJECT_INSTANCE),
                sr.sop_instance_uid: (InstanceCommitState.COMMITTED, None),
            }
            assert failed.attempt == 1 and failed.follow_up is FollowUp.NONE

            # The scheduler's follow-up lane, as `strokeseg scp` wires it (service.receiver).
            follow_up = CommitmentFollowUp(
                ctx.commitments, ctx.store, settings.destinations, calling_ae_title=OUR_AE,
                max_attempts=settings.delivery.commitment_max_attempts,
                retry_initial_s=settings.delivery.retry_initial_s,
                retry_max_interval_s=settings.delivery.retry_max_interval_s,
                evt_handlers=report_handlers(ctx.commitments),
            )
            scheduler = Scheduler()
            scheduler.every("storage commitment follow-up", 0.1, follow_up.tick,
                            lane="commitment-follow-up", first_after_s=0.1)
            scheduler.start()
            try:
                states_now = wait_for(
                    lambda: (s := ctx.commitments.destination_states([job_id])[job_id])
                    and s[0].state is DestinationState.COMMITTED and s,
                    20, "the re-sent SEG to be committed",
                )
            finally:
                scheduler.stop()
            latency = time.monotonic() - reported

            again = next(
                t for t in ctx.commitments.transactions(job_id=job_id)
                if t.retry_of == failed.transaction_uid
            )
            assert again.attempt == 2 and again.state is CommitmentState.COMMITTED
            assert [i.sop_instance_uid for i in again.instances] == [seg.sop_instance_uid]
            assert again.transaction_uid != failed.transaction_uid
            old = ctx.commitments.transaction(failed.transaction_uid)
            assert old is not None and old.follow_up is FollowUp.REREQUESTED
            assert again.transaction_uid in old.follow_up_detail and "0x0112" in old.follow_up_detail
            assert pacs.has_instance(seg.sop_instance_uid)  # same SOP Instance UID, back in PACS
            (dest_state,) = states_now
            assert (dest_state.instances, dest_state.committed, dest_state.attempts) == (2, 2, 2)
            assert ctx.commitments.instances_to_resend(destination="orthanc") == []
            resent = [d for d in ctx.store.deliveries(job_id) if "re-sent" in d.detail]
            assert [(d.kind, d.sop_instance_uid, d.status) for d in resent] == [
                ("SEG", seg.sop_instance_uid, "stored")
            ]
            history = [reason for _, reason, _ in ctx.store.events(job_id)]
            assert any("re-requesting as" in r and "attempt 2 of 3" in r for r in history)
            assert ctx.store.job(job_id).state is JobState.DELIVERED  # type: ignore[union-attr]

            record_property("failure_report_to_committed_s", round(latency, 3))
            print(f"\nOrthanc: SEG failure report -> re-sent, re-requested, committed in {latency:.2f} s "
                  f"(retry_initial_s 0.2, follow-up poll 0.1 s)")
            ctx.db.dispose()
    finally:
        scp.stop()
        db.dispose()


# ------------------------------------------------------ against a scripted PACS


@pytest.fixture
def follow_up_db(tmp_path: Path) -> Iterator[tuple[Database, StorageSCP]]:
    db = Database(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    scp = _our_scp(free_port(), db, tmp_path / "spool")
    scp.start()
    yield db, scp
    scp.stop()
    db.dispose()


def _follow_up(db: Database, destination: Destination, max_attempts: int = 3) -> CommitmentFollowUp:
    commitments = CommitmentStore(db)
    return CommitmentFollowUp(
        commitments, JobStore(db), [destination], calling_ae_title=OUR_AE, max_attempts=max_attempts,
        retry_initial_s=0.05, retry_max_interval_s=0.1, evt_handlers=report_handlers(commitments),
    )


def _run_until_settled(follow_up: CommitmentFollowUp, timeout_s: float = 20.0) -> list[Any]:
    """Tick until nothing is left to follow up (every attempt reported, none due)."""
    done: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done += follow_up.tick()
        open_ = [
            t for t in follow_up.commitments.transactions()
            if t.state is CommitmentState.REQUESTED
            or (t.state is not CommitmentState.COMMITTED and t.follow_up is FollowUp.NONE)
        ]
        if not open_:
            return done
        time.sleep(0.05)
    raise AssertionError(f"follow-up did not settle: {done}")


@pytest.mark.network
def test_attempts_are_bounded_and_the_last_failure_is_recorded(
    tmp_path: Path, follow_up_db: tuple[Database, StorageSCP]
) -> None:
    db, _scp = follow_up_db
    series, objects = _results(tmp_path)
    seg = next(o for o in objects if o.kind == "SEG")
    store, commitments = JobStore(db), CommitmentStore(db)
    job_id = _job(store, series)
    with ScriptedPACS({seg.sop_instance_uid: 99}) as pacs:  # never commits the SEG
        destination = pacs.destination()
        assert all(o.stored for o in store_objects(destination, objects, calling_ae_title=OUR_AE))
        _commit(commitments, destination, objects, job_id)
        done = _run_until_settled(_follow_up(db, destination, max_attempts=3))
        assert _follow_up(db, destination, max_attempts=3).tick() == []  # nothing more, ever

    assert [d.outcome for d in done] == [FollowUp.REREQUESTED, FollowUp.REREQUESTED, FollowUp.GAVE_UP]
    chain = _chain(commitments, "scripted")
    assert [(t.attempt, t.state) for t in chain] == [
        (1, CommitmentState.PARTIALLY_FAILED), (2, CommitmentState.FAILED), (3, CommitmentState.FAILED),
    ]
    assert [t.retry_of for t in chain] == [None, chain[0].transaction_uid, chain[1].transaction_uid]
    assert [t.follow_up for t in chain] == [FollowUp.REREQUESTED, FollowUp.REREQUESTED, FollowUp.GAVE_UP]
    assert all([i.sop_instance_uid for i in t.instances] == [seg.sop_instance_uid] for t in chain[1:])
    assert chain[2].follow_up_detail == (
        "gave up after 3 attempt(s): 1 of 1 instance(s) failed: 0x0110 processing failure"
    )
    # the SEG went out three times (delivery + two re-sends), always as the same instance
    assert pacs.stored[seg.sop_instance_uid] == 3
    assert pacs.requests[1:] == [[seg.sop_instance_uid]] * 2
    (state,) = commitments.destination_states([job_id])[job_id]
    assert state.state is DestinationState.FAILED
    assert (state.instances, state.committed, state.failed, state.attempts) == (2, 1, 1, 3)
    assert "gave up after 3 attempt(s)" in state.reason and "0x0110" in state.reason
    history = [reason for _, reason, _ in store.events(job_id)]
    assert history[-1].startswith("storage commitment at scripted failed: gave up after 3 attempt(s)")


@pytest.mark.network
def test_an_instance_failed_once_commits_at_the_second_attempt(
    tmp_path: Path, follow_up_db: tuple[Database, StorageSCP]
) -> None:
    db, _scp = follow_up_db
    series, objects = _results(tmp_path)
    sr = next(o for o in objects if o.kind == "SR")
    store, commitments = JobStore(db), CommitmentStore(db)
    job_id = _job(store, series)
    with ScriptedPACS({sr.sop_instance_uid: 1}, reason=0x0213) as pacs:
        destination = pacs.destination()
        store_objects(destination, objects, calling_ae_title=OUR_AE)
        first = _commit(commitments, destination, objects, job_id)
        summary = commitments.transaction(first)
        assert summary is not None and summary.failure_summary == (
            "1 of 2 instance(s) failed: 0x0213 resource limitation"
        )
        (pending,) = commitments.destination_states([job_id])[job_id]
        assert pending.state is DestinationState.PENDING and "re-request due" in pending.reason
        done = _run_until_settled(_follow_up(db, destination))
    assert [d.outcome for d in done] == [FollowUp.REREQUESTED]
    assert [(t.attempt, t.state) for t in _chain(commitments, "scripted")] == [
        (1, CommitmentState.PARTIALLY_FAILED), (2, CommitmentState.COMMITTED),
    ]
    assert pacs.stored[sr.sop_instance_uid] == 2
    (state,) = commitments.destination_states([job_id])[job_id]
    assert (state.state, state.committed, state.instances) == (DestinationState.COMMITTED, 2, 2)


@pytest.mark.network
def test_a_follow_up_cut_off_by_a_crash_is_finished_by_the_next_process(
    tmp_path: Path, follow_up_db: tuple[Database, StorageSCP]
) -> None:
    db, _scp = follow_up_db
    series, objects = _results(tmp_path)
    seg = next(o for o in objects if o.kind == "SEG")
    job_id = _job(JobStore(db), series)
    with ScriptedPACS({seg.sop_instance_uid: 1}) as pacs:
        destination = pacs.destination()
        store_objects(destination, objects, calling_ae_title=OUR_AE)
        first = _commit(CommitmentStore(db), destination, objects, job_id)
        # A process records the re-request, then dies before re-sending or asking.
        crashed = new_transaction_uid()
        assert CommitmentStore(db).begin_follow_up(
            first, crashed, [SOPReference(seg.sop_class_uid, seg.sop_instance_uid, str(seg.path))],
            detail="test: the process dies here",
        )
        assert not CommitmentStore(db).begin_follow_up(first, new_transaction_uid(), [seg], detail="twice")
        db.dispose()

        reopened = Database(db.engine.url.render_as_string(hide_password=False))  # a new process
        try:
            commitments = CommitmentStore(reopened)
            time.sleep(0.05)
            assert commitments.flag_timed_out(older_than_s=0.01) == [crashed]  # the scheduler's time-out sweep
            done = _run_until_settled(_follow_up(reopened, destination))
            chain = _chain(commitments, "scripted")
        finally:
            reopened.dispose()
    assert [d.outcome for d in done] == [FollowUp.REREQUESTED]
    assert [(t.attempt, t.state, t.follow_up) for t in chain] == [
        (1, CommitmentState.PARTIALLY_FAILED, FollowUp.REREQUESTED),
        (2, CommitmentState.TIMED_OUT, FollowUp.REREQUESTED),
        (3, CommitmentState.COMMITTED, FollowUp.NONE),
    ]
    assert pacs.stored[seg.sop_instance_uid] == 2  # the crashed attempt sent nothing


# ------------------------------------------------------------- the store's rules


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url"))


def _refs(folder: Path, n: int) -> list[SOPReference]:
    """``n`` instances on disk (small MR images), as a commitment request names them."""
    series = make_dwi_series(n, 8, 8)
    paths = write_series(series, folder)
    return [
        SOPReference(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(path))
        for ds, path in zip(series, paths, strict=True)
    ]


def test_follow_up_rules_in_the_store(db_url: str, tmp_path: Path) -> None:
    db = Database(db_url)
    try:
        store = CommitmentStore(db)
        refs = _refs(tmp_path, 2)
        uid = new_transaction_uid()
        store.record_request(uid, refs, destination="pacs")
        due = {"max_attempts": 3, "retry_initial_s": 0.3, "retry_max_interval_s": 10.0}
        assert store.due_follow_ups(**due) == []  # waiting for the report
        store.apply_report(
            uid, committed=[(refs[0].sop_class_uid, refs[0].sop_instance_uid)],
            failed=[(refs[1].sop_class_uid, refs[1].sop_instance_uid, 0x0112)],
        )
        assert store.due_follow_ups(**due) == []  # backoff: 0.3 s after the report
        time.sleep(0.35)
        (txn,) = store.due_follow_ups(**due)
        assert txn.transaction_uid == uid and txn.attempt == 1
        assert [t.sop_instance_uid for t in store.instances_to_resend(transaction_uid=uid)] == [
            refs[1].sop_instance_uid
        ]

        second = new_transaction_uid()
        assert store.begin_follow_up(uid, second, refs[1:], detail="re-requesting")
        assert not store.begin_follow_up(uid, new_transaction_uid(), refs[1:], detail="again")
        assert not store.close_follow_up(uid, FollowUp.GAVE_UP, "too late")
        summary = store.transaction(second)
        assert summary is not None
        assert (summary.attempt, summary.retry_of, summary.state) == (2, uid, CommitmentState.REQUESTED)
        store.record_action(second, status_code=None, accepted=False, detail="re-send failed: down")
        time.sleep(0.65)  # attempt 2 waits 0.6 s
        (txn,) = store.due_follow_ups(**due)
        assert txn.transaction_uid == second and txn.failure_summary == "re-send failed: down"
        # attempts used up: due at once, without waiting
        assert [t.transaction_uid for t in store.due_follow_ups(**{**due, "max_attempts": 2,
                                                                  "retry_initial_s": 60.0})] == [second]
        with pytest.raises(ValueError, match="gave_up or superseded"):
            store.close_follow_up(second, FollowUp.REREQUESTED, "no")
        assert store.close_follow_up(second, FollowUp.GAVE_UP, "gave up after 2 attempt(s): down")
        assert store.due_follow_ups(**due) == []
    finally:
        db.dispose()


@pytest.mark.network
def test_follow_up_gives_up_or_supersedes_without_the_network(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    try:
        store = CommitmentStore(db)
        nowhere = Destination(name="nowhere", ae_title="NOWHERE", host="127.0.0.1", port=free_port(),
                              storage_commitment=True)
        follow_up = CommitmentFollowUp(store, JobStore(db), [nowhere], calling_ae_title=OUR_AE,
                                       retry_initial_s=0.01)
        refs = _refs(tmp_path / "mr", 2)

        def failed(destination: str, ref: SOPReference) -> str:
            uid = new_transaction_uid()
            store.record_request(uid, [ref], destination=destination)
            store.apply_report(uid, committed=[], failed=[(ref.sop_class_uid, ref.sop_instance_uid, 0x0110)])
            return uid

        gone = failed("removed-from-config", refs[0])
        missing_file = SOPReference(refs[0].sop_class_uid, new_transaction_uid(), str(tmp_path / "gone.dcm"))
        no_file = failed("nowhere", missing_file)
        covered = failed("nowhere", refs[0])
        store.record_request(new_transaction_uid(), [refs[0]], destination="nowhere")  # e.g. `retry`
        time.sleep(0.05)
        outcomes = {r.transaction_uid: (r.outcome, r.detail) for r in follow_up.tick()}
        assert outcomes[gone][0] is FollowUp.GAVE_UP
        assert "no longer configured for storage commitment" in outcomes[gone][1]
        assert outcomes[no_file][0] is FollowUp.GAVE_UP
        assert "result file missing from the spool" in outcomes[no_file][1]
        assert outcomes[covered][0] is FollowUp.SUPERSEDED
        assert follow_up.tick() == []

        # unreachable destination: the re-request is recorded and failed, the next one waits
        unreachable = failed("nowhere", refs[1])
        time.sleep(0.05)
        (result,) = follow_up.tick()
        assert result.transaction_uid == unreachable and result.outcome is FollowUp.REREQUESTED
        assert result.new_transaction_uid is not None
        second = store.transaction(result.new_transaction_uid)
        assert second is not None and second.state is CommitmentState.FAILED
        assert second.detail.startswith("re-send failed: destination nowhere") and "unreachable" in second.detail
    finally:
        db.dispose()


# --------------------------------------------------------------- strokeseg jobs


def test_jobs_command_shows_delivery_and_commitment_per_destination(tmp_path: Path) -> None:
    config = tmp_path / "strokeseg.yaml"
    config.write_text(f"spool_dir: {tmp_path / 'spool'}\n")
    settings = load_settings(config)
    db = Database(settings.database_url)
    store, commitments = JobStore(db), CommitmentStore(db)

    def delivered(name: str, kinds: dict[str, bool], detail: str = "") -> tuple[int, list[SOPReference]]:
        job_id = _job(store, make_dwi_series(1, 8, 8))  # a study of its own
        refs = []
        for kind, ok in kinds.items():
            ref = SOPReference("1.2.840.10008.5.1.4.1.1.66.4", new_transaction_uid(), f"/r/{kind}.dcm")
            store.record_delivery(
                job_id, destination=name, kind=kind, sop_class_uid=ref.sop_class_uid,
                sop_instance_uid=ref.sop_instance_uid, path=ref.path, status="stored" if ok else "failed",
                status_code=0 if ok else 0xA700, detail="stored" if ok else detail,
            )
            refs.append(ref)
        return job_id, refs

    def report(uid: str, refs: list[SOPReference], failed: dict[str, int]) -> None:
        commitments.apply_report(
            uid,
            committed=[(r.sop_class_uid, r.sop_instance_uid) for r in refs if r.sop_instance_uid not in failed],
            failed=[(r.sop_class_uid, r.sop_instance_uid, failed[r.sop_instance_uid])
                    for r in refs if r.sop_instance_uid in failed],
        )

    # committed everywhere
    ok_job, refs = delivered("orthanc", {"SEG": True, "SR": True})
    uid = new_transaction_uid()
    commitments.record_request(uid, refs, destination="orthanc", job_id=ok_job)
    report(uid, refs, {})
    # waiting for the report, and a second destination without commitment
    wait_job, refs = delivered("orthanc", {"SEG": True, "SR": True})
    commitments.record_request(new_transaction_uid(), refs, destination="orthanc", job_id=wait_job)
    store.record_delivery(wait_job, destination="archive", kind="SEG", sop_class_uid=refs[0].sop_class_uid,
                          sop_instance_uid=refs[0].sop_instance_uid, path="", status="stored",
                          status_code=0, detail="stored")
    # failed for good after attempts ran out
    bad_job, refs = delivered("orthanc", {"SEG": True, "SR": True})
    uid = new_transaction_uid()
    commitments.record_request(uid, refs, destination="orthanc", job_id=bad_job)
    report(uid, refs, {refs[0].sop_instance_uid: 0x0112})
    commitments.close_follow_up(uid, FollowUp.GAVE_UP,
                                "gave up after 3 attempt(s): 1 of 2 instance(s) failed: 0x0112 no such object instance")
    # not even stored
    down_job, _ = delivered("pacs", {"SEG": False}, "destination pacs (PACS@127.0.0.1:104): unreachable or aborted")
    db.dispose()

    result = run_cli(config, "jobs")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.strip().splitlines()
    names = header.split("\t")
    assert names[7] == "delivery" and names[-1] == "validity"
    column = {int(line.split("\t")[0]): line.split("\t")[7] for line in lines}
    assert column[ok_job] == "orthanc: stored 2/2, committed 2/2"
    assert column[wait_job] == (
        "archive: stored 1/1, no commitment requested | orthanc: stored 2/2, commitment pending "
        "0/2 committed (waiting for the report to attempt 1)"
    )
    assert column[bad_job] == (
        "orthanc: stored 2/2, commitment failed 1/2 committed (gave up after 3 attempt(s): "
        "1 of 2 instance(s) failed: 0x0112 no such object instance)"
    )
    assert column[down_job] == (
        "pacs: stored 0/1 (SEG destination pacs (PACS@127.0.0.1:104): unreachable or aborted)"
    )

    listing = run_cli(config, "commitments")
    assert listing.returncode == 0, listing.stderr
    rows = [line.split("\t") for line in listing.stdout.strip().splitlines()]
    assert rows[0][-2:] == ["attempt", "follow_up"]
    assert any(r[3] == "partially_failed" and r[9].startswith("gave_up: gave up after 3") for r in rows[1:])
