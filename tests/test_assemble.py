"""Study completion: idle timeout, and content-aware early completion over a real SCP."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from service.assemble import StudyAssembler, study_completeness, study_looks_complete
from service.db import Database, InstanceSignature, JobStore
from service.domain import JobState
from service.handoff import HandOff
from service.intake import signature_of
from service.scheduler import Scheduler
from service.scp import ReceivingStudies, StorageSCP
from service.storage import Spool
from tests.conftest import free_port
from tests.peers import storescu, wait_for


def _stack(series: str, role: str, b: float | None, positions: list[float]) -> list[InstanceSignature]:
    return [InstanceSignature(series, role, b, p) for p in positions]


POSITIONS = [float(5 * i) for i in range(20)]


def test_complete_with_dwi_and_adc() -> None:
    sigs = _stack("dwi", "dwi", 1000, POSITIONS) + _stack("adc", "adc", None, POSITIONS)
    assert study_looks_complete(sigs)


def test_complete_with_dwi_and_b0_when_no_adc() -> None:
    sigs = _stack("dwi", "dwi", 1000, POSITIONS) + _stack("dwi", "b0", 0, POSITIONS)
    assert study_looks_complete(sigs)


@pytest.mark.parametrize(
    "sigs",
    [
        _stack("dwi", "dwi", 1000, POSITIONS),  # no ADC, no b0 yet
        _stack("dwi", "dwi", 1000, POSITIONS[:7] + POSITIONS[8:]) + _stack("a", "adc", None, POSITIONS),  # hole
        _stack("dwi", "dwi", 1000, POSITIONS) + _stack("a", "adc", None, POSITIONS[:-1]),  # ADC short
        _stack("dwi", "b0", 0, POSITIONS) + _stack("a", "adc", None, POSITIONS),  # no high b
        [InstanceSignature("enh", "", None, None, frames=50)],  # multi-frame: unknown
        [],
    ],
)
def test_incomplete_studies_wait(sigs: list[InstanceSignature]) -> None:
    assert not study_looks_complete(sigs)


@pytest.mark.network
def test_content_aware_completion_closes_before_idle_timeout(tmp_path: Path, phantom_cases: list[Path]) -> None:
    db = Database(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    store = JobStore(db)
    scp = StorageSCP(
        ae_title="STROKESEG", host="127.0.0.1", port=free_port(), spool=Spool(tmp_path / "spool"),
        store=store, describe=signature_of,
    )
    dispatched: list[int] = []
    idle_timeout_s = 30.0
    assembler = StudyAssembler(
        store, HandOff(store, dispatched.append), completion_timeout_s=idle_timeout_s,
        early_completion_grace_s=1.0,
    )
    scheduler = Scheduler()
    scheduler.every("study completion", 0.2, assembler.tick)
    scp.start()
    scheduler.start()
    try:
        # A study without ADC/b0 (only the b1000 images) must wait for the idle timeout.
        partial = tmp_path / "partial"
        partial.mkdir()
        case = phantom_cases[0]
        for f in (case / "dicom").rglob("*.dcm"):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            if float(ds.get("DiffusionBValue", 0) or 0) >= 500 and "ADC" not in ds.ImageType:
                (partial / f.name).write_bytes(f.read_bytes())
        storescu(scp.port, partial)
        time.sleep(2.5)
        jobs = store.jobs()
        assert len(jobs) == 1 and jobs[0].state is JobState.RECEIVED, "b1000 alone is not complete"
        sent_at = time.monotonic()
        storescu(scp.port, case / "dicom")  # the rest arrives: b0 and ADC
        last_image_at = time.monotonic()
        wait_for(lambda: dispatched, idle_timeout_s - 5, "content-aware completion")
        closed_after_s = time.monotonic() - last_image_at
        job = store.job(dispatched[0])
        assert job is not None and job.state is JobState.QUEUED
        assert store.events(job.id)[-1][1] == "complete (content-aware)"
        print(
            f"content-aware completion: closed {closed_after_s:.1f} s after the last image "
            f"(idle timeout {idle_timeout_s:.0f} s; sending took {last_image_at - sent_at:.1f} s)"
        )
        assert closed_after_s < idle_timeout_s / 2
    finally:
        scheduler.stop()
        scp.stop()
        db.dispose()


@pytest.mark.parametrize(
    "sigs",
    [
        # a transfer cut after 4 of 20 high-b slices: its own b0 has all 20
        _stack("dwi", "dwi", 1000, POSITIONS[:4]) + _stack("dwi", "b0", 0, POSITIONS),
        # the ADC of the same slab has slices the DWI lacks
        _stack("dwi", "dwi", 1000, POSITIONS[:10]) + _stack("a", "adc", None, POSITIONS),
    ],
)
def test_dwi_cut_short_is_incomplete(sigs: list[InstanceSignature]) -> None:
    assert study_completeness(sigs) is False


def _directions(series: str, n: int, positions: list[float]) -> list[InstanceSignature]:
    return [sig for _ in range(n) for sig in _stack(series, "directional", 1000, positions)]


def test_directional_only_acquisition_is_complete() -> None:
    """Philips/GE/Canon classic export without a trace: the directions stand in for it."""
    sigs = _directions("dti", 16, POSITIONS) + _stack("dti", "b0", 0, POSITIONS)
    assert study_completeness(sigs) is True


@pytest.mark.parametrize(
    "sigs",
    [
        # cut mid-volume: the last two positions hold 15 of 16 directions
        _directions("dti", 15, POSITIONS) + _directions("dti", 1, POSITIONS[:-2])
        + _stack("dti", "b0", 0, POSITIONS),
        # all directions, no b0 yet
        _directions("dti", 16, POSITIONS),
        # b0 of the series reaches beyond the directions received so far
        _directions("dti", 16, POSITIONS[:6]) + _stack("dti", "b0", 0, POSITIONS),
    ],
)
def test_directional_only_acquisition_cut_short_is_incomplete(sigs: list[InstanceSignature]) -> None:
    assert study_completeness(sigs) is False


def test_incomplete_study_waits_once_more_at_the_idle_timeout(tmp_path: Path) -> None:
    """Idle but incomplete: queued only after the extra wait; a complete one at the timeout."""
    store = JobStore(Database(f"sqlite:///{tmp_path / 'jobs.sqlite'}"))
    cut = _stack("s1", "dwi", 1000, POSITIONS[:4]) + _stack("s1", "b0", 0, POSITIONS)
    whole = _stack("s2", "dwi", 1000, POSITIONS) + _stack("s2", "b0", 0, POSITIONS)
    for study, sigs in (("1.2.3.1", cut), ("1.2.3.2", whole)):
        for i, sig in enumerate(sigs):
            store.record_instance(
                study_instance_uid=study, series_instance_uid=sig.series_instance_uid,
                sop_instance_uid=f"{study}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                path=str(tmp_path / f"{study}-{i}.dcm"), size_bytes=1, calling_ae_title="SCANNER",
                signature=sig,
            )
    dispatched: list[int] = []
    assembler = StudyAssembler(store, HandOff(store, dispatched.append), completion_timeout_s=0.5,
                               incomplete_extra_wait_s=2.0)
    time.sleep(0.7)
    assembler.tick()
    jobs = {job.study_instance_uid: job for job in store.jobs()}
    assert jobs["1.2.3.2"].state is JobState.QUEUED
    assert jobs["1.2.3.1"].state is JobState.RECEIVED  # waiting once more
    time.sleep(2.0)
    assembler.tick()
    job = store.job(jobs["1.2.3.1"].id)
    assert job is not None and job.state is JobState.QUEUED
    assert "still incomplete" in job.reason
    assert sorted(dispatched) == sorted(j.id for j in jobs.values())


def test_receiving_studies_follows_each_open_association() -> None:
    """The study an open association last stored counts until it closes, moves on, or stalls too long."""
    now = [100.0]
    receiving = ReceivingStudies(clock=lambda: now[0])
    receiving.stored(1, "1.2.3.1")
    receiving.stored(2, "1.2.3.2")
    assert receiving.studies(hold_s=30) == {"1.2.3.1", "1.2.3.2"}
    receiving.stored(1, "1.2.3.3")  # association 1 moved on to the next study
    assert receiving.studies(hold_s=30) == {"1.2.3.2", "1.2.3.3"}
    receiving.closed(2)
    assert receiving.studies(hold_s=30) == {"1.2.3.3"}
    now[0] += 31  # association 1 stays open but stored nothing for longer than the hold
    assert receiving.studies(hold_s=30) == set()


def test_study_still_arriving_on_an_open_association_is_not_closed(tmp_path: Path) -> None:
    """Idle and complete by content, but its association is still open: held; queued once it is not."""
    store = JobStore(Database(f"sqlite:///{tmp_path / 'jobs.sqlite'}"))
    whole = _stack("s1", "dwi", 1000, POSITIONS) + _stack("s1", "b0", 0, POSITIONS)
    for i, sig in enumerate(whole):
        store.record_instance(
            study_instance_uid="1.2.3.1", series_instance_uid=sig.series_instance_uid,
            sop_instance_uid=f"1.2.3.1.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            path=str(tmp_path / f"{i}.dcm"), size_bytes=1, calling_ae_title="SCANNER", signature=sig,
        )
    arriving = {"1.2.3.1"}
    dispatched: list[int] = []
    assembler = StudyAssembler(store, HandOff(store, dispatched.append), completion_timeout_s=0.3,
                               early_completion_grace_s=0.1, still_arriving=lambda: arriving)
    time.sleep(0.5)
    assert assembler.tick() == []
    assert [job.state for job in store.jobs()] == [JobState.RECEIVED]
    arriving.clear()  # the association closed
    assert assembler.tick() == dispatched and len(dispatched) == 1
    assert store.jobs()[0].state is JobState.QUEUED


@pytest.mark.network
def test_sender_stalled_mid_study_gets_one_job_for_the_whole_study(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    """Over a real association: a stall longer than the idle timeout does not split the study.

    Half the study, a pause of three idle timeouts with the association open, then the
    rest on the same association: one job, queued only after the release, holding every
    image (before the hold, the first half was processed and the rest refused as a
    second job under load).
    """
    from pynetdicom import AE

    db = Database(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    store = JobStore(db)
    scp = StorageSCP(
        ae_title="STROKESEG", host="127.0.0.1", port=free_port(), spool=Spool(tmp_path / "spool"),
        store=store, describe=signature_of,
    )
    dispatched: list[int] = []
    assembler = StudyAssembler(
        store, HandOff(store, dispatched.append), completion_timeout_s=1.0, early_completion_grace_s=0.5,
        still_arriving=lambda: scp.receiving.studies(30.0),
    )
    scheduler = Scheduler()
    scheduler.every("study completion", 0.2, assembler.tick)
    files = sorted((phantom_cases[0] / "dicom").rglob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    scp.start()
    scheduler.start()
    try:
        ae = AE(ae_title="MRI1")
        for sop_class, syntax in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
            ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="STROKESEG")
        assert assoc.is_established
        try:
            half = len(datasets) // 2
            for ds in datasets[:half]:
                assert assoc.send_c_store(ds).Status == 0
            time.sleep(3.0)  # three idle timeouts with the association open
            jobs = store.jobs()
            assert len(jobs) == 1 and jobs[0].state is JobState.RECEIVED, "closed while still arriving"
            assert dispatched == []
            for ds in datasets[half:]:
                assert assoc.send_c_store(ds).Status == 0
        finally:
            assoc.release()
        wait_for(lambda: dispatched, 20, "the study closed after the release")
        jobs = store.jobs()
        assert len(jobs) == 1 and jobs[0].state is JobState.QUEUED
        assert len(store.instance_paths(jobs[0].study_instance_uid)) == len(datasets)
    finally:
        scheduler.stop()
        scp.stop()
        db.dispose()
