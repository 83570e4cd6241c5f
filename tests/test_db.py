"""The job store on SQLite and on the machine's real PostgreSQL."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from service.db import Database, JobStore, ReceivedInstance, RecordedInstance, validity_fields
from service.db.models import Base, Instance
from service.db.session import alembic_config
from service.domain import JobState


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> JobStore:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    db = Database(url)
    request.addfinalizer(db.dispose)
    return JobStore(db)


def _receive(store: JobStore, sop: str, study: str = "1.2.840.1") -> int:
    return store.record_instance(
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        path=f"/spool/{sop}.dcm",
        size_bytes=10,
        calling_ae_title="MRI1",
    )


def test_instances_of_one_study_share_one_open_job(store: JobStore) -> None:
    a = _receive(store, "1.1")
    b = _receive(store, "1.2")
    assert a == b
    assert store.instance_paths("1.2.840.1") == ["/spool/1.1.dcm", "/spool/1.2.dcm"]


def test_resent_instance_replaces_not_duplicates(store: JobStore) -> None:
    _receive(store, "1.1")
    job_id = _receive(store, "1.1")
    assert store.instance_paths("1.2.840.1") == ["/spool/1.1.dcm"]
    summary = store.job(job_id)
    assert summary is not None and summary.instances == 1


def test_completion_waits_for_idle_study(store: JobStore) -> None:
    job_id = _receive(store, "1.1")
    assert store.complete_studies(idle_s=60) == []
    time.sleep(0.05)
    assert store.complete_studies(idle_s=0.01) == [job_id]
    assert store.job(job_id).state is JobState.QUEUED  # type: ignore[union-attr]
    # An image arriving after the job was queued opens a new job (new result version).
    assert _receive(store, "1.3") != job_id


def test_claim_is_exclusive_and_history_is_kept(store: JobStore) -> None:
    job_id = _receive(store, "1.1")
    store.complete_studies(idle_s=0)
    assert store.claim(job_id) is True
    assert store.claim(job_id) is False
    assert store.transition(job_id, JobState.REFUSED, "no diffusion series")
    summary = store.job(job_id)
    assert summary is not None
    assert summary.state is JobState.REFUSED and summary.reason == "no diffusion series"
    assert summary.attempts == 1 and summary.finished_at is not None
    assert [state for state, _, _ in store.events(job_id)] == [
        "received", "queued", "running", "refused",
    ]


def test_restart_recovers_queued_and_stale_running_jobs(store: JobStore) -> None:
    queued = _receive(store, "1.1", study="1.2.840.1")
    running = _receive(store, "2.1", study="1.2.840.2")
    store.complete_studies(idle_s=0)
    store.claim(running)
    # a fresh running job is left alone (a live worker may have it) ...
    assert store.jobs_to_requeue(stale_after_s=3600) == [queued]
    # ... a stale one goes back to the queue
    assert sorted(store.jobs_to_requeue(stale_after_s=0)) == sorted([queued, running])
    assert store.job(running).state is JobState.QUEUED  # type: ignore[union-attr]


def test_retry_only_from_failed(store: JobStore) -> None:
    job_id = _receive(store, "1.1")
    store.complete_studies(idle_s=0)
    assert store.retry(job_id) is False
    store.claim(job_id)
    store.transition(job_id, JobState.FAILED, "delivery failed: destination down")
    assert store.retry(job_id) is True
    assert store.job(job_id).state is JobState.QUEUED  # type: ignore[union-attr]


def test_migrations_are_idempotent(sqlite_url: str) -> None:
    Database(sqlite_url).dispose()
    Database(sqlite_url).dispose()  # second upgrade is a no-op, not an error


def test_a_newer_result_supersedes_the_older_one(store: JobStore) -> None:
    first = _receive(store, "1.1")
    store.complete_studies(idle_s=0)
    store.claim(first)
    store.transition(first, JobState.DELIVERED)
    second = _receive(store, "1.1")  # the study is sent again: a new job, a new result version
    assert second != first
    store.complete_studies(idle_s=0)
    store.claim(second)
    assert store.previous_result(second).id == first  # type: ignore[union-attr]
    store.transition(second, JobState.DELIVERED)
    assert store.supersede(second) == [first]
    assert store.job(first).superseded_by == second  # type: ignore[union-attr]
    assert store.previous_result(second) is None
    assert store.events(first)[-1][1] == f"superseded by job {second}"


# -- domain of validity and hold-back (schema 0007) ---------------------------------


def _held(store: JobStore, sop: str = "1.1", study: str = "1.2.840.1") -> int:
    job_id = _receive(store, sop, study)
    store.complete_studies(idle_s=0)
    store.claim(job_id)
    reasons = ["b=3000 s/mm2 outside the validated 900-1600", "SNR 4.2 < 6"]
    assert store.transition(
        job_id, JobState.HELD, "held: outside validated range (...)",
        fields={"lesion_volume_ml": 3.5, **validity_fields("outside", reasons)},
    )
    return job_id


def test_validity_is_recorded_on_the_job(store: JobStore) -> None:
    job_id = _receive(store, "1.1")
    assert store.job(job_id).validity == ""  # type: ignore[union-attr]
    store.complete_studies(idle_s=0)
    store.claim(job_id)
    store.transition(job_id, JobState.DELIVERED, fields=validity_fields("within", []))
    summary = store.job(job_id)
    assert summary is not None
    assert (summary.validity, summary.validity_reasons) == ("within", ())
    held = _held(store, "2.1", study="1.2.840.2")
    (listed,) = [j for j in store.jobs() if j.id == held]
    assert listed.validity == "outside"
    assert listed.validity_reasons == (
        "b=3000 s/mm2 outside the validated 900-1600", "SNR 4.2 < 6",
    )
    with pytest.raises(ValueError, match="within' or 'outside"):
        validity_fields("maybe", [])
    assert validity_fields("outside", ["a\nb", "c"])["validity_reasons"] == "a b\nc"


def test_held_is_final_and_only_release_queues_it(store: JobStore) -> None:
    assert JobState.HELD.is_final
    job_id = _held(store)
    summary = store.job(job_id)
    assert summary is not None and summary.state is JobState.HELD
    assert summary.finished_at is not None and summary.released_at is None
    assert store.retry(job_id) is False  # retry is for failed deliveries, not for held results
    assert store.jobs_to_requeue(stale_after_s=0) == []  # a restart does not release it either
    assert store.release(job_id) is True
    summary = store.job(job_id)
    assert summary is not None and summary.state is JobState.QUEUED
    assert summary.released_at is not None
    assert store.release(job_id) is False
    assert [state for state, _, _ in store.events(job_id)] == [
        "received", "queued", "running", "held", "queued",
    ]
    assert store.events(job_id)[-1][1] == "released by operator"


def test_newer_delivered_result_of_the_study(store: JobStore) -> None:
    held = _held(store)
    assert store.newer_delivered(held) is None
    newer = _receive(store, "1.1")  # the study sent again
    store.complete_studies(idle_s=0)
    store.claim(newer)
    store.transition(newer, JobState.DELIVERED)
    assert store.newer_delivered(held) == newer
    assert store.newer_delivered(newer) is None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0007_matches_the_model_and_downgrades(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert [d for d in diffs if "jobs" in repr(d)] == []
        held = _held(JobStore(db))
        cfg = alembic_config()
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0006")
        with db.engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("jobs")}
            state, reason = conn.execute(
                text("SELECT state, reason FROM jobs WHERE id = :i"), {"i": held}
            ).one()
        assert not {"validity", "validity_reasons", "released_at"} & columns
        assert state == "failed" and reason.endswith("(held before downgrade)")
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        assert JobStore(db).job(held).validity == ""  # type: ignore[union-attr]
    finally:
        db.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_orm_metadata_matches_the_head_migration_with_no_side_effect_import(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Every table the code maps is in service.db.models, and the head migration creates exactly
    that schema. Run in a fresh interpreter that imports only the models module, so a table
    registered on Base.metadata by some other import cannot make the comparison pass."""
    import subprocess
    import sys

    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url")
    Database(url).dispose()  # migrated to head
    script = (
        "import sys\n"
        "from alembic.autogenerate import compare_metadata\n"
        "from alembic.migration import MigrationContext\n"
        "from sqlalchemy import create_engine\n"
        "from service.db.models import Base, Instance\n"
        "assert 'service.db.commitment' not in sys.modules\n"
        "engine = create_engine(sys.argv[1])\n"
        "with engine.connect() as conn:\n"
        "    diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)\n"
        "tables = sorted(Base.metadata.tables)\n"
        "print(tables)\n"
        "assert {'jobs', 'instances', 'studies', 'commitment_transactions', 'commitment_instances'} <= set(tables)\n"
        "assert diffs == [], diffs\n"
    )
    run = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_read_only_commands_do_not_migrate(tmp_path: Path) -> None:
    """`strokeseg jobs` and `commitments` read; only `db-upgrade` (and the services) migrate. On a
    database behind the code they say what to run instead of changing the schema."""
    import subprocess
    import sys

    from sqlalchemy import create_engine

    db_file = tmp_path / "jobs.sqlite"
    url = f"sqlite:///{db_file}"
    cfg = alembic_config()
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0006")
    engine.dispose()
    config = tmp_path / "c.yaml"
    config.write_text(f"spool_dir: {tmp_path / 'spool'}\ndatabase_url: {url}\n")

    def revision() -> str:
        engine = create_engine(url)
        with engine.connect() as conn:
            value = str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar())
        engine.dispose()
        return value

    for command_name in ("jobs", "commitments"):
        run = subprocess.run([sys.executable, "-m", "service.cli", command_name, "-c", str(config)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0, run.stdout
        assert "strokeseg db-upgrade" in run.stderr, run.stderr
        assert revision() == "0006"
    run = subprocess.run([sys.executable, "-m", "service.cli", "db-upgrade", "-c", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert revision() != "0006"
    run = subprocess.run([sys.executable, "-m", "service.cli", "jobs", "-c", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("id\tstate"), run.stderr


def test_record_received_says_where_a_resent_instance_was_stored(store: JobStore) -> None:
    """One transaction records the instance and returns its previous path (the SCP removes that file)."""
    received = ReceivedInstance("1.2.840.9", "1.2.840.9.1", "1.2.840.9.1.1", "1.2.840.10008.5.1.4.1.1.4",
                                "/spool/a.dcm", 10, "MRI1")
    first = store.record_received(received)
    assert first.previous_path is None
    assert store.recorded_path("1.2.840.9.1.1") == "/spool/a.dcm"
    moved = replace(received, series_instance_uid="1.2.840.9.2", path="/spool/b.dcm")
    again = store.record_received(moved)
    assert again == RecordedInstance(first.job_id, "/spool/a.dcm")
    assert store.instance_paths("1.2.840.9") == ["/spool/b.dcm"]
    assert [job.id for job in store.jobs(study_instance_uid="1.2.840.9")] == [first.job_id]


def test_the_sqlite_driver_path_writes_what_the_core_path_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite the C-STORE's transaction runs as plain SQL (speed); its rows must be the ones
    the SQLAlchemy Core path (kept for PostgreSQL) writes, read back through the ORM's types."""
    from datetime import datetime

    import service.db.store as store_module
    from service.domain import ImageRole, InstanceSignature

    clock = iter(datetime(2026, 12, 3, 8, 0, second) for second in range(60))
    tables = ("studies", "instances", "jobs", "job_events")

    def rows(driver_path: bool) -> dict[str, list[tuple[object, ...]]]:
        db = Database(f"sqlite:///{tmp_path / f'{driver_path}.sqlite'}")
        store = JobStore(db)
        if not driver_path:
            store._store_time = None
        assert (store._store_time is not None) == driver_path
        signature = InstanceSignature("1.2.9.1", role=ImageRole.DWI, b_value=1000.0, slice_position=-12.5)
        first = ReceivedInstance("1.2.9", "1.2.9.1", "1.2.9.1.1", "1.2.840.10008.5.1.4.1.1.4",
                                 "/spool/a.dcm", 10, "MRI1", signature)
        results = [store.record_received(first),
                   store.record_received(replace(first, sop_instance_uid="1.2.9.1.2", path="/spool/c.dcm")),
                   store.record_received(replace(first, path="/spool/b.dcm", signature=None))]
        assert results[2].previous_path == "/spool/a.dcm"
        store.queue(results[0].job_id)
        results.append(store.record_received(replace(first, sop_instance_uid="1.2.9.1.3")))  # a late image
        assert results[3].job_id != results[0].job_id  # a new job: the first one left 'received'
        out = {}
        with db.session() as s:
            for table in tables:
                out[table] = [tuple(r) for r in s.execute(text(f"select * from {table} order by 1, 2"))]
            out["read through the ORM"] = [
                (i.sop_instance_uid, i.received_at, i.role, i.b_value, i.slice_position, i.frames)
                for i in s.scalars(select(Instance).order_by(Instance.sop_instance_uid))]
        db.dispose()
        return out

    monkeypatch.setattr(store_module, "utcnow", lambda: next(clock))
    driver = rows(True)
    clock = iter(datetime(2026, 12, 3, 8, 0, second) for second in range(60))
    core = rows(False)
    assert driver == core
    assert len(driver["instances"]) == 3 and len(driver["jobs"]) == 2
    assert driver["read through the ORM"][0] == (
        "1.2.9.1.1", datetime(2026, 12, 3, 8, 0, 2), "other", None, None, 1)  # re-sent without a signature
    assert driver["read through the ORM"][1][1:] == (datetime(2026, 12, 3, 8, 0, 1), "dwi", 1000.0, -12.5, 1)
