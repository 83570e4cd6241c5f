"""Drills on real processes: a worker killed mid-job, a broker message lost, and a broker that
dies and comes back empty, are recovered while the service runs (no restart) and the results
reach the PACS exactly once; no patient identifier reaches a log, /metrics or a job record.

Split deployment (``strokeseg scp`` + ``strokeseg worker``) on the machine's real Redis and
PostgreSQL. The PACS is a pynetdicom storage SCP in this process, so the test can hold the
worker inside its first C-STORE (the moment it is killed) and count what arrives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis
import yaml
from pynetdicom import AE, StoragePresentationContexts, evt

from service.db import Database, JobStore
from tests.conftest import free_port
from tests.peers import Strokeseg, echo_ok, run_cli, storescu, wait_for, write_config

pytestmark = [pytest.mark.network, pytest.mark.slow]

REDIS_DB = 11


class HoldingPACS:
    """A storage SCP that records every C-STORE and holds the first one for ``hold_s`` seconds.

    Like a PACS that wrote the object and then stalled before answering: the first object
    is recorded on arrival, so a re-send of it is visible as a second arrival of one UID.
    """

    def __init__(self, hold_s: float = 0.0) -> None:
        self.port = free_port()
        self.hold_s = hold_s
        self.arrivals: list[tuple[str, str]] = []  # (SOP Class UID, SOP Instance UID)
        self.first_store = threading.Event()
        self._lock = threading.Lock()
        self.ae = AE(ae_title="PACS")
        self.ae.supported_contexts = StoragePresentationContexts
        self.server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        with self._lock:
            self.arrivals.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
            first = not self.first_store.is_set()
            self.first_store.set()
        if first and self.hold_s:
            time.sleep(self.hold_s)
        return 0x0000

    def __enter__(self) -> HoldingPACS:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    def destination(self) -> dict[str, Any]:
        return {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": self.port}

    def unique(self) -> set[tuple[str, str]]:
        with self._lock:
            return set(self.arrivals)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc: the Celery pool's worker processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _job(config: Path, study_uid: str) -> list[str] | None:
    result = run_cli(config, "jobs")
    assert result.returncode == 0, result.stderr
    for line in result.stdout.strip().splitlines()[1:]:
        fields = line.split("\t")
        if study_uid in fields:
            return fields
    return None


def _config(tmp_path: Path, pacs: HoldingPACS, postgres_url: str, **worker: Any) -> tuple[Path, int]:
    port = free_port()
    config = write_config(
        tmp_path / "split.yaml", scp_port=port, spool=tmp_path / "spool",
        destinations=[pacs.destination()], completion_timeout_s=1.0,
        database_url=postgres_url, broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
        worker={"intra_op_threads": 2, "queue": f"gpu-drill-{uuid.uuid4().hex[:8]}", **worker},
    )
    return config, port


def _study_uid(case: Path) -> str:
    return str(json.loads((case / "truth" / "truth.json").read_text())["study_instance_uid"])


def test_worker_killed_mid_job_is_delivered_once_without_a_restart(
    tmp_path: Path, phantom_cases: list[Path], postgres_url: str
) -> None:
    case = phantom_cases[0]
    study_uid = _study_uid(case)
    with HoldingPACS(hold_s=20.0) as pacs:
        config, port = _config(tmp_path, pacs, postgres_url, lease_s=3.0)
        with Strokeseg("worker", config, log=tmp_path / "worker.log") as worker, \
                Strokeseg("scp", config, log=tmp_path / "scp.log") as scp:
            wait_for(lambda: echo_ok(port), 60, "strokeseg scp to answer C-ECHO")
            storescu(port, case / "dicom")
            assert pacs.first_store.wait(180), worker.output()
            assert worker.proc is not None
            pool = _children(worker.proc.pid)
            assert pool, "no Celery pool process to kill"
            for pid in pool:
                os.kill(pid, signal.SIGKILL)  # the worker dies inside its first C-STORE
            killed = time.monotonic()
            wait_for(
                lambda: (j := _job(config, study_uid)) and j[1] == "delivered", 120,
                "the job delivered after the kill, with nobody restarting anything",
            )
            recovered_s = time.monotonic() - killed
            print(f"worker killed mid-job: delivered {recovered_s:.1f} s later")
            assert worker.proc.poll() is None, "the worker's main process must survive its pool child"
            kinds = sorted(cls for cls, _ in pacs.unique())
            assert len(kinds) == 2, pacs.arrivals  # one SEG, one SR: the re-run re-sent the same UIDs
            assert len(pacs.unique()) == 2
            # Either the re-delivered task claimed the expired lease, or the SCP queued the job again.
            db = Database(postgres_url, migrate=False)
            try:
                store = JobStore(db)
                (job_id,) = [j.id for j in store.jobs(study_instance_uid=study_uid)]
                reasons = " | ".join(reason for _, reason, _ in store.events(job_id))
                summary = store.job(job_id)
            finally:
                db.dispose()
            assert "lease expired" in reasons or "lease of worker" in reasons, reasons
            assert summary is not None and summary.attempts >= 2
            assert scp.stop() == 0, scp.output()
            assert worker.stop() == 0, worker.output()
    assert recovered_s < 120


def test_lost_broker_message_is_handed_over_again_without_a_restart(
    tmp_path: Path, phantom_cases: list[Path], postgres_url: str
) -> None:
    case = phantom_cases[0]
    study_uid = _study_uid(case)
    with HoldingPACS() as pacs:
        config, port = _config(tmp_path, pacs, postgres_url, lost_dispatch_after_s=5.0)
        broker = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
        with Strokeseg("scp", config, log=tmp_path / "scp.log") as scp:
            wait_for(lambda: echo_ok(port), 60, "strokeseg scp to answer C-ECHO")
            storescu(port, case / "dicom")
            wait_for(lambda: (j := _job(config, study_uid)) and j[1] == "queued", 60, "the job queued")
            broker.flushdb()  # the hand-off is lost: no worker will ever see that message
            with Strokeseg("worker", config, log=tmp_path / "worker.log") as worker:
                wait_for(lambda: (j := _job(config, study_uid)) and j[1] == "delivered", 120,
                         "the job delivered after its message was lost")
                assert len(pacs.unique()) == 2
                assert "handing it to the broker again" in scp.output()
                assert worker.stop() == 0, worker.output()
            assert scp.stop() == 0, scp.output()


class _Redis:
    """A redis-server of the test's own, on its own port, that the test can stop and start."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self._ping(), 20, "redis-server to answer")

    def _ping(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.exceptions.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # a broker crash, not a clean shutdown: queued messages are gone
            self.proc.wait()
            self.proc = None


def test_broker_down_and_back_delivers_without_a_restart_and_leaks_no_phi(
    tmp_path: Path, phantom_cases: list[Path], postgres_url: str
) -> None:
    """The broker dies, a study arrives meanwhile, the broker comes back empty: delivered.

    Also the no-PHI drill: the phantom's patient name and ID appear in no log, no /metrics
    page and no job record of the run.
    """
    case = phantom_cases[0]
    study_uid = _study_uid(case)
    broker = _Redis(tmp_path / "redis")
    broker.start()
    metrics_port = free_port()
    with HoldingPACS() as pacs:
        config, port = _config(tmp_path, pacs, postgres_url, lost_dispatch_after_s=5.0)
        text = config.read_text().replace(f"redis://127.0.0.1:6379/{REDIS_DB}",
                                          f"redis://127.0.0.1:{broker.port}/0")
        config.write_text(text + f"metrics: {{scp_port: {metrics_port}, worker_port: 0}}\n")
        try:
            with Strokeseg("scp", config, log=tmp_path / "scp.log") as scp, \
                    Strokeseg("worker", config, log=tmp_path / "worker.log") as worker:
                wait_for(lambda: echo_ok(port), 60, "strokeseg scp to answer C-ECHO")
                broker.stop()
                storescu(port, case / "dicom")  # received while the broker is down
                wait_for(lambda: (j := _job(config, study_uid)) and j[1] == "queued", 60, "the job queued")
                time.sleep(3)
                broker.start()  # back, empty
                wait_for(lambda: (j := _job(config, study_uid)) and j[1] == "delivered", 180,
                         "the job delivered once the broker is back")
                assert len(pacs.unique()) == 2
                page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
                jobs = run_cli(config, "jobs").stdout
                assert scp.stop() == 0, scp.output()
                assert worker.stop() == 0, worker.output()
                logs = scp.output() + worker.output()
        finally:
            broker.stop()
    sent = pydicom.dcmread(next((case / "dicom").rglob("*.dcm")), stop_before_pixels=True)
    for identifier in (str(sent.PatientName), str(sent.PatientID)):
        assert identifier and identifier not in logs
        assert identifier.encode() not in page
        assert identifier not in jobs


def test_scp_killed_after_receiving_loses_nothing(
    tmp_path: Path, phantom_cases: list[Path], postgres_url: str
) -> None:
    """kill -9 of the SCP between receiving a study and queueing it: after a restart it is delivered once."""
    case = phantom_cases[0]
    study_uid = _study_uid(case)
    with HoldingPACS() as pacs:
        config, port = _config(tmp_path, pacs, postgres_url)
        settings = yaml.safe_load(config.read_text())
        settings["study"].update(completion_timeout_s=8.0, early_completion=False)  # still 'received' at the kill
        config.write_text(yaml.safe_dump(settings))
        with Strokeseg("worker", config, log=tmp_path / "worker.log") as worker:
            first = Strokeseg("scp", config, log=tmp_path / "scp1.log").start()
            assert first.proc is not None
            wait_for(lambda: echo_ok(port), 60, "strokeseg scp to answer C-ECHO")
            storescu(port, case / "dicom")
            first.proc.kill()  # every image was acknowledged: each is on disk and in the database
            first.proc.wait()
            job = _job(config, study_uid)
            assert job is not None and job[1] == "received", job
            with Strokeseg("scp", config, log=tmp_path / "scp2.log") as second:
                wait_for(lambda: (j := _job(config, study_uid)) and j[1] == "delivered", 120,
                         "the study delivered after the SCP's restart")
                assert len(pacs.unique()) == 2
                assert second.stop() == 0, second.output()
            assert worker.stop() == 0, worker.output()
