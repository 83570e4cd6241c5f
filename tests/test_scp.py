"""The SCP on a real socket, driven by dcmtk's echoscu/storescu and a pynetdicom SCU."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

import service.storage
from service.db import Database, JobStore, ReceivedInstance, RecordedInstance
from service.scp import StorageSCP
from service.storage import Spool
from tests.conftest import dcmtk_tool, free_port
from tests.dicom_factory import make_dwi_series, write_series

pytestmark = pytest.mark.network


class _Running:
    def __init__(self, scp: StorageSCP, store: JobStore, spool: Spool) -> None:
        self.scp, self.store, self.spool = scp, store, spool

    @property
    def port(self) -> int:
        return self.scp.port


def _start(tmp_path: Path, **kwargs: object) -> _Running:
    db = Database(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    store = JobStore(db)
    spool = Spool(tmp_path / "spool")
    scp = StorageSCP(
        ae_title="STROKESEG", host="127.0.0.1", port=free_port(), spool=spool, store=store,
        **kwargs,  # type: ignore[arg-type]
    )
    scp.start()
    return _Running(scp, store, spool)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[_Running]:
    r = _start(tmp_path)
    yield r
    r.scp.stop()


def _storescu(port: int, files: list[Path], *, calling: str = "MRI1") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk_tool("storescu"), "-aet", calling, "-aec", "STROKESEG", "-nh", "127.0.0.1",
         str(port), *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )


def _echo(port: int, calling: str = "MRI1") -> int:
    return subprocess.run(
        [dcmtk_tool("echoscu"), "-aet", calling, "-aec", "STROKESEG", "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=30,
    ).returncode


def test_echo(running: _Running) -> None:
    assert _echo(running.port) == 0


def test_store_is_on_disk_and_in_db_with_the_received_bytes(running: _Running, tmp_path: Path) -> None:
    files = write_series(make_dwi_series(5, 32, 32), tmp_path / "in")
    result = _storescu(running.port, files)
    assert result.returncode == 0, result.stderr
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    paths = running.store.instance_paths(study)
    assert len(paths) == 5
    for sent in files:
        ds = pydicom.dcmread(sent)
        stored = running.spool.instance_path(study, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        assert str(stored) in paths
        # The stored dataset is exactly what was sent (byte-identical after the file meta).
        assert pydicom.dcmread(stored).PixelData == ds.PixelData
        assert pydicom.dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID


def test_resent_study_has_no_duplicates(running: _Running, tmp_path: Path) -> None:
    files = write_series(make_dwi_series(4, 32, 32), tmp_path / "in")
    assert _storescu(running.port, files).returncode == 0
    assert _storescu(running.port, files).returncode == 0
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert len(running.store.instance_paths(study)) == 4
    assert len(list(running.spool.incoming.rglob("*.dcm"))) == 4


def test_unparseable_dataset_gets_failure_and_scp_keeps_serving(
    running: _Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_dwi_series(3, 16, 16)[0]
    # A dataset body that no DICOM parser can read: a sequence whose item claims
    # more bytes than follow.  Sent as raw bytes (the SCU-side encoder is bypassed).
    broken = (
        b"\x08\x00\x16\x00UI" + len(b"1.2.840.10008.5.1.4.1.1.4\x00").to_bytes(2, "little")
        + b"1.2.840.10008.5.1.4.1.1.4\x00"
        + b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0d\x00\x00\x00" + b"\x00" * 8
    )
    monkeypatch.setattr("pynetdicom.association.encode", lambda *a, **k: broken)
    ae = AE(ae_title="MRI1")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="STROKESEG")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC000
    assert running.store.instance_paths(str(ds.StudyInstanceUID)) == []
    assert list(running.spool.incoming.rglob("*.dcm")) == []
    assert _echo(running.port) == 0  # still serving


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize(
    ("element", "value"),
    [
        ("SOPInstanceUID", "1.2." + "3" * 200),  # 204 characters
        ("StudyInstanceUID", "1.2.840.abc.4"),  # not digits and dots
        ("SeriesInstanceUID", "1.2.3/../../etc"),  # would be a path in the spool
    ],
)
def test_invalid_uid_is_cannot_understand_on_every_backend(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str, element: str, value: str
) -> None:
    """The same bad UID gets the same answer, 0xC000, whatever database is behind the SCP."""
    url = (f"sqlite:///{tmp_path / 'jobs.sqlite'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_url"))
    db = Database(url)
    store = JobStore(db)
    spool = Spool(tmp_path / "spool")
    scp = StorageSCP(ae_title="STROKESEG", host="127.0.0.1", port=free_port(), spool=spool, store=store)
    scp.start()
    try:
        bad, good = make_dwi_series(2, 16, 16)
        setattr(bad, element, value)
        if element == "SOPInstanceUID":
            bad.file_meta.MediaStorageSOPInstanceUID = value
        files = write_series([bad, good], tmp_path / "in")
        # dcmtk's storescu sends what it is given (pynetdicom's SCU refuses such UIDs itself).
        sent = subprocess.run(
            [dcmtk_tool("storescu"), "-d", "-aet", "MRI1", "-aec", "STROKESEG", "-nh",
             "127.0.0.1", str(scp.port), *map(str, files)],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        scp.stop()
    statuses = re.findall(r"DIMSE Status\s*:\s*(0x[0-9A-Fa-f]{4})", sent.stdout + sent.stderr)
    assert [int(s, 16) for s in statuses] == [0xC000, 0x0000], sent.stdout + sent.stderr
    assert list(spool.incoming.rglob("*.dcm")) == [spool.incoming.joinpath(*_spool_parts(good))]
    db.dispose()


def _spool_parts(ds: pydicom.Dataset) -> tuple[str, ...]:
    return (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), f"{ds.SOPInstanceUID}.dcm")


def test_persistence_failure_is_never_success(running: _Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*_: object, **__: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(running.spool, "store_instance", disk_full)
    files = write_series(make_dwi_series(2, 16, 16), tmp_path / "in")
    ae = AE(ae_title="MRI1")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="STROKESEG")
    status = assoc.send_c_store(pydicom.dcmread(files[0]))
    assoc.release()
    assert status.Status == 0xA700


def test_store_below_the_free_space_floor_is_out_of_resources(tmp_path: Path) -> None:
    """0xA700 before the disk is full: the sender keeps the image; nothing is half-written."""
    from service import metrics

    running = _start(tmp_path, min_free_bytes=10**18)  # an exabyte floor: always short of space
    try:
        files = write_series(make_dwi_series(2, 16, 16), tmp_path / "in")
        sent = subprocess.run(
            [dcmtk_tool("storescu"), "-d", "-aet", "MRI1", "-aec", "STROKESEG", "-nh", "127.0.0.1",
             str(running.port), *map(str, files)], capture_output=True, text=True, timeout=60,
        )
        statuses = re.findall(r"DIMSE Status\s*:\s*(0x[0-9A-Fa-f]{4})", sent.stdout + sent.stderr)
        assert [int(s, 16) for s in statuses] == [0xA700, 0xA700], sent.stdout + sent.stderr
        assert not running.spool.incoming.exists() or list(running.spool.incoming.rglob("*.dcm")) == []
        assert metrics.STORE_FAILURES.labels(status=hex(0xA700))._value.get() >= 2  # counted for ops
    finally:
        running.scp.stop()
    running = _start(tmp_path / "roomy", min_free_bytes=1)
    try:
        assert _storescu(running.port, files).returncode == 0
        assert len(list(running.spool.incoming.rglob("*.dcm"))) == 2
    finally:
        running.scp.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_locked_database_gets_a_bounded_out_of_resources_and_no_orphan_file(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """A DB that stays locked costs a sender lock_timeout_s and a 0xA700, not a hung association."""
    import sqlite3
    import time

    from sqlalchemy import create_engine, text

    url = (f"sqlite:///{tmp_path / 'jobs.sqlite'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_url"))
    db = Database(url, lock_timeout_s=1.0)
    store, spool = JobStore(db), Spool(tmp_path / "spool")
    scp = StorageSCP(ae_title="STROKESEG", host="127.0.0.1", port=free_port(), spool=spool, store=store)
    scp.start()
    files = write_series(make_dwi_series(2, 16, 16), tmp_path / "in")
    if backend == "sqlite":
        locker = sqlite3.connect(tmp_path / "jobs.sqlite", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    else:
        engine = create_engine(url)
        locker = engine.connect()  # type: ignore[assignment]
        locker.execute(text("BEGIN"))
        locker.execute(text("LOCK TABLE instances IN ACCESS EXCLUSIVE MODE"))
    try:
        started = time.monotonic()
        sent = subprocess.run(
            [dcmtk_tool("storescu"), "-d", "-aet", "MRI1", "-aec", "STROKESEG", "-nh", "127.0.0.1",
             str(scp.port), str(files[0])], capture_output=True, text=True, timeout=60,
        )
        elapsed = time.monotonic() - started
    finally:
        locker.rollback()
        locker.close()
    try:
        statuses = re.findall(r"DIMSE Status\s*:\s*(0x[0-9A-Fa-f]{4})", sent.stdout + sent.stderr)
        assert [int(s, 16) for s in statuses] == [0xA700], sent.stdout + sent.stderr
        assert elapsed < 15
        assert list(spool.incoming.rglob("*.dcm")) == []  # written, not recorded: removed
        assert _storescu(scp.port, files).returncode == 0  # the lock is gone: stored
        assert len(list(spool.incoming.rglob("*.dcm"))) == 2
    finally:
        scp.stop()
        db.dispose()


def test_address_outside_the_allowed_networks_is_disconnected(tmp_path: Path) -> None:
    from service import metrics

    before = metrics.ASSOCIATIONS_REJECTED.labels(reason="address not allowed")._value.get()
    outside = _start(tmp_path / "a", allowed_networks=["10.0.0.0/8", "fd00::/8"])
    try:
        assert _echo(outside.port) != 0  # 127.0.0.1 is not listed: no association
        files = write_series(make_dwi_series(1, 16, 16), tmp_path / "in")
        assert _storescu(outside.port, files).returncode != 0
        assert not outside.spool.incoming.exists()
    finally:
        outside.scp.stop()
    assert metrics.ASSOCIATIONS_REJECTED.labels(reason="address not allowed")._value.get() >= before + 2
    inside = _start(tmp_path / "b", allowed_networks=["10.0.0.0/8", "127.0.0.1/32"])
    try:
        assert _echo(inside.port) == 0
    finally:
        inside.scp.stop()


def test_database_down_then_up_answers_out_of_resources_then_stores(
    tmp_path: Path, postgres_url: str
) -> None:
    """PostgreSQL refuses the SCP's connections: a bounded 0xA700 and no file; back up: stored."""
    import time

    from sqlalchemy import create_engine, text

    from tests.conftest import POSTGRES_ADMIN_URL

    name = postgres_url.rsplit("/", 1)[1]
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    db = Database(postgres_url, lock_timeout_s=2.0)
    store, spool = JobStore(db), Spool(tmp_path / "spool")
    scp = StorageSCP(ae_title="STROKESEG", host="127.0.0.1", port=free_port(), spool=spool, store=store)
    scp.start()
    files = write_series(make_dwi_series(2, 16, 16), tmp_path / "in")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                         {"n": name})
        started = time.monotonic()
        sent = subprocess.run(
            [dcmtk_tool("storescu"), "-d", "-aet", "MRI1", "-aec", "STROKESEG", "-nh", "127.0.0.1",
             str(scp.port), str(files[0])], capture_output=True, text=True, timeout=60,
        )
        elapsed = time.monotonic() - started
        statuses = re.findall(r"DIMSE Status\s*:\s*(0x[0-9A-Fa-f]{4})", sent.stdout + sent.stderr)
        assert [int(s, 16) for s in statuses] == [0xA700], sent.stdout + sent.stderr
        assert elapsed < 15
        assert list(spool.incoming.rglob("*.dcm")) == []
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
        assert _storescu(scp.port, files).returncode == 0
        assert len(store.recorded_paths()) == 2
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
        scp.stop()
        db.dispose()
        admin.dispose()


def test_calling_ae_not_allowed_is_rejected(tmp_path: Path) -> None:
    r = _start(tmp_path, allowed_calling_aets=["MRI1"])
    try:
        assert _echo(r.port, calling="MRI1") == 0
        assert _echo(r.port, calling="INTRUDER") != 0
        files = write_series(make_dwi_series(2, 16, 16), tmp_path / "in")
        assert _storescu(r.port, files, calling="INTRUDER").returncode != 0
        assert list(r.spool.root.rglob("*.dcm")) == []
    finally:
        r.scp.stop()


def test_wrong_called_ae_is_rejected(running: _Running) -> None:
    ae = AE(ae_title="MRI1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="SOMEONE_ELSE")
    assert not assoc.is_established


def test_active_associations_gauge_follows_open_connections(running: _Running) -> None:
    """Two associations open -> 2; one released, one aborted -> back to 0 (counted from the
    transport's close, so an abort or a dropped peer cannot leave the gauge high)."""
    import time

    from prometheus_client import REGISTRY

    def gauge() -> float:
        return REGISTRY.get_sample_value("strokeseg_active_associations") or 0.0

    def settles_at(value: float) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if gauge() == value:
                return True
            time.sleep(0.02)
        return False

    ae = AE(ae_title="MRI1")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", running.port, ae_title="STROKESEG")
    second = ae.associate("127.0.0.1", running.port, ae_title="STROKESEG")
    assert first.is_established and second.is_established
    assert settles_at(2.0), gauge()
    first.release()
    assert settles_at(1.0), gauge()
    second.abort()
    assert settles_at(0.0), gauge()


def test_the_row_is_committed_only_after_the_file_is_fsynced(
    running: _Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file and its folder entry are fsync'd before the row is written, the row before Success."""
    order: list[str] = []
    real_fsync, real_record = os.fsync, running.store.record_received
    monkeypatch.setattr(service.storage.os, "fsync", lambda fd: (real_fsync(fd), order.append("fsync"))[0])

    def record(received: ReceivedInstance) -> RecordedInstance:
        assert Path(received.path).is_file()
        order.append("record")
        recorded = real_record(received)
        order.append("committed")
        return recorded

    monkeypatch.setattr(running.store, "record_received", record)
    files = write_series(make_dwi_series(1, 16, 16), tmp_path / "in")
    assert _storescu(running.port, files).returncode == 0
    assert order[-2:] == ["record", "committed"] and order[:-2].count("fsync") >= 2  # file + folder
    assert running.store.recorded_path(str(pydicom.dcmread(files[0]).SOPInstanceUID)) is not None


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498." + "9" * 37])
@pytest.mark.parametrize("transfer_syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"])
def test_the_file_header_is_the_one_pynetdicom_writes(sop_instance_uid: str, transfer_syntax: str) -> None:
    """The SCP builds the Part 10 header itself (faster); byte for byte pynetdicom's encoded_dataset()'s."""
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from service.scp.server import file_meta_bytes

    expected = b"\0" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=MRImageStorage, sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax))
    assert file_meta_bytes(MRImageStorage, sop_instance_uid, transfer_syntax) == expected
