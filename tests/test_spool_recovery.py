"""The spool is the system of record for what was received.

On the embedded SQLite database the SCP's row commits do not wait for the disk (the file
itself is fsync'd before Success), so a power loss may take back the latest rows; at start
the receiver records every spool file the database lost. Checked here: which engine does
what, the sweep on its own, and a drill on real processes (storescu -> serve killed with
SIGKILL -> the study's rows removed as a power loss would -> serve again -> SEG + SR at a
real storescp referencing every image that was sent).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pydicom
import pytest

from service.db import Database, JobStore
from service.db.session import make_engine
from service.intake import signature_of
from service.recovery import RECOVERED_FROM_SPOOL, record_unrecorded_instances
from service.storage import Spool, remove_tree_durably
from tests.conftest import free_port
from tests.dicom_factory import make_dwi_series, write_series
from tests.peers import (
    StoreSCP,
    Strokeseg,
    echo_ok,
    sent_high_b_uids,
    storescu,
    wait_for,
    write_config,
)

SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"


def _synchronous(url: str, *, durable_commits: bool) -> int:
    engine = make_engine(url, durable_commits=durable_commits)
    try:
        with engine.connect() as connection:
            return int(connection.exec_driver_sql("PRAGMA synchronous").scalar_one())
    finally:
        engine.dispose()


def test_only_the_scp_engine_commits_without_waiting_for_the_disk(tmp_path: Path) -> None:
    """FULL (2) everywhere, NORMAL (1) on the C-STORE path's own engine; the receiver wires it."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert _synchronous(url, durable_commits=True) == 2
    assert _synchronous(url, durable_commits=False) == 1

    from service.config import load_settings
    from service.receiver import Receiver

    config = tmp_path / "c.yaml"
    config.write_text(f"spool_dir: {tmp_path / 'spool'}\nscp:\n  port: {free_port()}\n"
                      "metrics:\n  scp_port: 0\n  worker_port: 0\n")
    receiver = Receiver(load_settings(config), lambda job_id: None)
    try:
        with receiver.intake_db.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA synchronous").scalar_one() == 1
        with receiver.db.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2
        assert receiver.scp.handlers[1][1].store is receiver.intake_store
    finally:
        receiver.intake_db.dispose()
        receiver.db.dispose()


def _spool_with_series(tmp_path: Path, n: int) -> tuple[Spool, list[Path]]:
    spool = Spool(tmp_path / "spool")
    source = tmp_path / "series"
    write_series(make_dwi_series(n_slices=n, rows=32, columns=32, seed=3), source)
    paths = []
    for file in sorted(source.iterdir()):
        ds = pydicom.dcmread(file)
        paths.append(spool.store_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                          file.read_bytes()))
    return spool, paths


def test_unrecorded_spool_files_are_recorded_with_their_signature(tmp_path: Path) -> None:
    spool, paths = _spool_with_series(tmp_path, 6)
    (paths[0].parent / ".tmp-x.dcm-1-2.part").write_bytes(b"half")  # a torn temp file: never recorded
    (paths[0].parent / "broken.dcm").write_bytes(b"not dicom")  # unreadable: left for the orphan sweep
    store = JobStore(Database(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    from service.db import ReceivedInstance

    store.record_received(ReceivedInstance(  # one row survived the power loss
        first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID,
        first.SOPClassUID, str(paths[0]), paths[0].stat().st_size, "MRI1", signature_of(first)))

    recorded = record_unrecorded_instances(store, spool, signature_of)

    assert sorted(recorded) == sorted(paths[1:])
    assert store.recorded_paths() == {str(p) for p in paths}
    signatures = store.instance_signatures(str(first.StudyInstanceUID))
    assert len(signatures) == 6
    assert {s.role.value for s in signatures} == {signature_of(first).role.value}
    assert all(s.slice_position is not None for s in signatures)
    jobs = store.jobs(study_instance_uid=str(first.StudyInstanceUID))
    assert [j.state.value for j in jobs] == ["received"]  # one open job, completed as usual
    assert record_unrecorded_instances(store, spool, signature_of) == []  # idempotent
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        callers = {row[0] for row in db.execute("select calling_ae_title from instances")}
    assert callers == {"MRI1", RECOVERED_FROM_SPOOL}


def test_removal_is_made_durable_on_the_parent_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, paths = _spool_with_series(tmp_path, 2)
    study_folder = paths[0].parent.parent
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    remove_tree_durably(study_folder)
    assert not study_folder.exists()
    assert synced == [str(spool.incoming)]


@pytest.mark.network
@pytest.mark.slow
def test_rows_lost_to_a_power_loss_are_rebuilt_from_the_spool(tmp_path: Path, phantom_cases: list[Path]) -> None:
    case = phantom_cases[0]
    study_uid = json.loads((case / "truth" / "truth.json").read_text())["study_instance_uid"]
    port = free_port()
    with StoreSCP(tmp_path / "pacs") as peer:
        config = write_config(tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
                              destinations=[peer.destination()], completion_timeout_s=600.0)
        serve = Strokeseg("serve", config).start()
        try:
            wait_for(lambda: echo_ok(port), 60, "serve to start")
            storescu(port, case / "dicom")
        finally:
            assert serve.proc is not None
            serve.proc.kill()  # kill -9, no clean-up; its worker dies with it (test_serve_supervision)
            serve.proc.wait()
        # What a power loss may take back: the study's rows, committed but not yet on disk.
        database = tmp_path / "spool" / "strokeseg.sqlite"
        with sqlite3.connect(database) as db:
            sent = db.execute("select count(*) from instances where study_instance_uid = ?",
                              (study_uid,)).fetchone()[0]
            assert sent == sum(1 for _ in (case / "dicom").rglob("*.dcm"))
            db.execute("delete from job_events where job_id in (select id from jobs where study_instance_uid = ?)",
                       (study_uid,))
            db.execute("delete from jobs where study_instance_uid = ?", (study_uid,))
            db.execute("delete from instances where study_instance_uid = ?", (study_uid,))
            db.execute("delete from studies where study_instance_uid = ?", (study_uid,))
        config = write_config(tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
                              destinations=[peer.destination()], completion_timeout_s=1.0)
        with Strokeseg("serve", config, log=tmp_path / "serve2.log") as again:
            seg = wait_for(lambda: next((ds for ds in peer.received() if ds.SOPClassUID == SEG_UID
                                         and str(ds.StudyInstanceUID) == study_uid), None),
                           180, "the SEG after the restart")
            assert "from the spool" in again.output()
        referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                      for item in series.ReferencedInstanceSequence}
        assert set(sent_high_b_uids(case)) <= referenced
        with sqlite3.connect(database) as db:
            assert db.execute("select count(*) from instances where study_instance_uid = ?",
                              (study_uid,)).fetchone()[0] == sent
            states = [row[0] for row in db.execute("select state from jobs where study_instance_uid = ?",
                                                    (study_uid,))]
        assert states == ["delivered"]
