"""The ``strokeseg`` command line."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from service.config import Settings, load_settings
from service.errors import ConfigError, StrokesegError, StudyRefused

if TYPE_CHECKING:
    from service.db import Database, DestinationDelivery, JobSummary
    from service.db.commitment import DestinationCommitment
    from service.receiver import Receiver

app = typer.Typer(
    help="strokeseg: acute ischemic stroke lesion segmentation on diffusion MRI, DICOM in, "
    "DICOM SEG + SR out. Research use only; not for diagnosis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file (default: $STROKESEG_CONFIG; env STROKESEG_<SECTION>__<KEY> overrides).",
        exists=True,
        dir_okay=False,
    ),
]

log = logging.getLogger("service.cli")  # not __name__: run as `python -m service.cli` it is __main__


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO; keep its notices, not its chatter.
    for chatty in ("pynetdicom", "highdicom", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _settings(config: Path | None) -> Settings:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _setup_logging(settings.log_level)
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        # Child processes (the worker started by `serve`) read the same file.
        os.environ["STROKESEG_CONFIG"] = str(config.resolve())
    return settings


def _receiver(settings: Settings, *, stale_job_after_s: float | None = None) -> Receiver:
    """The SCP process (service.receiver), handing complete studies to the Celery broker."""
    from service.receiver import Receiver
    from service.worker.app import dispatcher

    return Receiver(settings, dispatcher(settings), stale_job_after_s=stale_job_after_s)


def _wait_for_signal(extra_check: threading.Event | None = None) -> None:
    stop = extra_check or threading.Event()

    def _handler(signum: int, _frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    while not stop.wait(0.5):
        pass


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the DICOM SCP and a Celery worker together (embedded default: SQLite, no Redis).

    Ctrl-C stops both. Send studies to AE title scp.ae_title on scp.port.
    """
    settings = _settings(config)
    from service.worker.app import ensure_queue

    scp = _receiver(settings, stale_job_after_s=0.0)  # our own worker is not running yet
    ensure_queue(settings)
    from service.supervise import WorkerSupervisor

    worker = WorkerSupervisor([sys.executable, "-m", "service.cli", "worker", "--pool", "solo"])
    worker.start()
    stop = threading.Event()
    scp.start()
    typer.echo(
        f"strokeseg serving AE {settings.scp.ae_title} on {settings.scp.host}:{scp.scp.port}; "
        f"spool {settings.spool_dir}; Ctrl-C to stop",
        err=True,
    )
    try:
        _wait_for_signal(stop)
    finally:
        stop.set()
        scp.stop()
        worker.stop()
    typer.echo("strokeseg stopped", err=True)


@app.command()
def scp(config: ConfigOption = None) -> None:
    """Run only the DICOM SCP and study assembler (split deployment: Redis/RabbitMQ broker)."""
    settings = _settings(config)
    if settings.embedded_broker:
        log.warning("scp runs with the embedded broker %s; workers must share this host", settings.broker_url)
    process = _receiver(settings)
    process.start()
    try:
        _wait_for_signal()
    finally:
        process.stop()


def _start_heartbeat(every_s: float = 15.0) -> None:
    """strokeseg_worker_heartbeat_timestamp_seconds, so ops see a worker that stopped (alert WorkerDown)."""
    from service import metrics

    def beat() -> None:
        while True:
            metrics.WORKER_HEARTBEAT.set(time.time())
            time.sleep(every_s)

    threading.Thread(target=beat, name="worker-heartbeat", daemon=True).start()


@app.command()
def worker(
    config: ConfigOption = None,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork or solo.")] = "prefork",
) -> None:
    """Run a Celery worker consuming worker.queue (one per GPU; concurrency from config)."""
    settings = _settings(config)
    if pool == "prefork" and settings.metrics.worker_port:
        # Must be set before prometheus_client creates any metric (first import below).
        metrics_dir = settings.spool_dir / "metrics" / f"worker-{os.getpid()}"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from service.metrics import serve_metrics
    from service.worker.app import create_worker_app, ensure_queue

    ensure_queue(settings)
    celery_app = create_worker_app(settings)
    import service.worker.app as worker_app

    worker_app.preload_in_main_process = pool == "solo"
    from service.db import Database
    from service.health import model_bundles_check, process_checks, readiness

    checks = [*process_checks(settings, Database(settings.database_url, migrate=False)),
              model_bundles_check(settings)]
    serve_metrics(settings.metrics.worker_port, addr=settings.metrics.host, ready=readiness(checks))
    _start_heartbeat()
    argv = [
        "worker",
        "--queues", settings.worker.queue,
        "--concurrency", str(settings.worker.concurrency),
        "--pool", pool,
        "--loglevel", settings.log_level,
        "--hostname", f"strokeseg-{settings.worker.queue}-{os.getpid()}@%h",
        "--without-gossip", "--without-mingle",
    ]
    celery_app.worker_main(argv)


@app.command()
def segment(
    input_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder of DICOM files (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the SEG and SR files.")],
    model_dir: Annotated[Path | None, typer.Option(help="Model folder (model.onnx + model.yaml); default: the config's model_dir and model_routes.")] = None,
    overlay: Annotated[bool, typer.Option(help="Also write the colour overlay series.")] = False,
    config: ConfigOption = None,
) -> None:
    """Segment every study under INPUT_DIR without a network; one line per study.

    Exit code 1 if any study was refused or failed.
    """
    settings = _settings(config)
    from service.inference import LoadedModel, ModelRouter, load_model
    from service.intake import group_by_study
    from service.pipeline import model_router, segment_files

    model: LoadedModel | ModelRouter
    try:
        if model_dir is not None:
            model = load_model(model_dir, intra_op_threads=settings.worker.intra_op_threads)
        else:
            model = model_router(settings)
            model.preload()
    except StrokesegError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    files = sorted(p for p in input_dir.rglob("*") if p.is_file())
    studies = group_by_study(files)
    if not studies:
        typer.echo(f"error: no DICOM studies under {input_dir}", err=True)
        raise typer.Exit(1)
    out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for study_uid, paths in sorted(studies.items()):
        try:
            result = segment_files(
                paths, model, out, settings.preprocess.profile_options(), settings.derive,
                overlay=overlay or settings.overlay_enabled,
                assess_settings=settings.assess,
            )
        except StrokesegError as exc:
            bad += 1
            if isinstance(exc, StudyRefused):
                typer.echo(f"{study_uid}\trefused\t{exc.reason}")
            else:
                typer.echo(f"{study_uid}\tfailed\t{exc}")
            continue
        except Exception as exc:  # report and go on with the next study
            bad += 1
            log.exception("study failed")
            typer.echo(f"{study_uid}\tfailed\tinternal error: {type(exc).__name__}: {exc}")
            continue
        line = f"{study_uid}\tok\t{result.segmentation.lesion_volume_ml:.2f} mL"
        if result.validity is not None and not result.validity.within:
            line += f"\t{result.validity.summary()}"
        typer.echo(line)
    raise typer.Exit(1 if bad else 0)


@app.command()
def phantom(
    output_dir: Annotated[Path, typer.Argument(help="Folder to write case_NNNN/ studies into.")],
    cases: Annotated[int, typer.Option(min=1, help="Number of studies.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same studies).")] = 0,
    domain: Annotated[str | None, typer.Option(help="Scanner domain A (Siemens-like 3T), B (GE-like 1.5T) or C (Philips-like 3T), written in that vendor's DICOM convention; default: mixed scanners, standard tags.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes writing studies in parallel.")] = 1,
    mimics: Annotated[str, typer.Option(help="Lesion mimics real scans show (cortical ribbon, T2 shine-through, susceptibility, ghosts, chronic infarcts, CSF partial volume, eyes, scalp fat): 'default' (each with its own probability), 'off' (the generator before mimics), 'all', or names separated by commas.")] = "default",
) -> None:
    """Write synthetic DWI studies (b0, b1000, ADC) with ground-truth lesion masks."""
    from models.synth import write_phantom_cases

    chosen: str | bool | None = None if mimics == "default" else mimics
    try:
        paths = write_phantom_cases(
            output_dir, cases, seed, domain=domain, workers=workers, mimics=chosen
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for path in paths:
        typer.echo(str(path))


def _delivery_column(
    deliveries: Sequence[DestinationDelivery], commitments: Sequence[DestinationCommitment]
) -> str:
    """Per destination: C-STORE state, then Storage Commitment state (committed/pending/failed + reason)."""
    by_name = {c.destination: c for c in commitments}
    parts = []
    for delivery in deliveries:
        text = f"{delivery.destination}: stored {delivery.stored}/{delivery.objects}"
        if delivery.failure:
            text += f" ({delivery.failure})"
        commitment = by_name.pop(delivery.destination, None)
        if commitment is None:
            text += ", no commitment requested" if delivery.stored else ""
        elif commitment.state.value == "committed":
            text += f", committed {commitment.committed}/{commitment.instances}"
        else:
            text += (
                f", commitment {commitment.state.value} {commitment.committed}/"
                f"{commitment.instances} committed ({commitment.reason})"
            )
        parts.append(text)
    for commitment in by_name.values():  # requested without a recorded C-STORE
        parts.append(
            f"{commitment.destination}: commitment {commitment.state.value} "
            f"{commitment.committed}/{commitment.instances} committed"
            + (f" ({commitment.reason})" if commitment.reason else "")
        )
    return " | ".join(parts) or "-"


def _validity_column(job: JobSummary) -> str:
    """``within``, ``OUTSIDE: <reasons>`` or ``-`` (not assessed: before schema 0007, or refused)."""
    if job.validity == "outside":
        return "OUTSIDE: " + "; ".join(job.validity_reasons)
    return job.validity or "-"


def _read_only_database(settings: Settings) -> Database:
    """The database for a command that only reads: never migrated here; exit 2 with what to
    run when its schema is not the one this code needs."""
    from service.db import Database
    from service.db.session import schema_behind

    db = Database(settings.database_url, migrate=False)
    try:
        problem = schema_behind(db.engine)
    except Exception as exc:
        db.dispose()
        typer.echo(f"error: cannot read the database ({type(exc).__name__}: {exc})", err=True)
        raise typer.Exit(2) from exc
    if problem is not None:
        db.dispose()
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    return db


@app.command()
def jobs(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(help="How many of the newest jobs.")] = 50,
) -> None:
    """List jobs: id, state, reason, lesion volume, timings, per destination whether the
    results are stored and committed (Storage Commitment: committed / pending / failed + reason),
    and whether the result lies inside the model's validated range (within / OUTSIDE: reasons)."""
    settings = _settings(config)
    from service.db import JobStore
    from service.db.commitment import CommitmentStore

    db = _read_only_database(settings)
    store = JobStore(db)
    listed = store.jobs(limit=limit)
    ids = [job.id for job in listed]
    deliveries = store.delivery_states(ids)
    commitment_states = CommitmentStore(db).destination_states(ids)
    typer.echo(
        "id\tstate\tvolume_ml\tcreated_utc\tfinished_utc\tstudy\treason\tdelivery\tvalidity"
    )
    for job in listed:
        volume = f"{job.lesion_volume_ml:.2f}" if job.lesion_volume_ml is not None else "-"
        finished = job.finished_at.isoformat(timespec="seconds") if job.finished_at else "-"
        reason = job.reason
        if job.superseded_by is not None:
            reason = f"{reason}; superseded by job {job.superseded_by}".lstrip("; ")
        delivery = _delivery_column(deliveries.get(job.id, []), commitment_states.get(job.id, []))
        typer.echo(
            f"{job.id}\t{job.display_state}\t{volume}\t{job.created_at.isoformat(timespec='seconds')}"
            f"\t{finished}\t{job.study_instance_uid}\t{reason}\t{delivery}\t{_validity_column(job)}"
        )


@app.command()
def commitments(
    config: ConfigOption = None,
    job: Annotated[int | None, typer.Option(help="Only this job's transactions.")] = None,
    limit: Annotated[int, typer.Option(help="How many of the newest transactions.")] = 50,
) -> None:
    """List Storage Commitment transactions: state, destination, instances, report latency,
    attempt (re-requests count up) and what the follow-up did (re-requested / gave_up + reason)."""
    settings = _settings(config)
    from service.db.commitment import CommitmentStore

    store = CommitmentStore(_read_only_database(settings))
    typer.echo(
        "transaction_uid\tjob\tdestination\tstate\tinstances\tcommitted\treport_s\tdetail"
        "\tattempt\tfollow_up"
    )
    for txn in store.transactions(job_id=job, limit=limit):
        committed = sum(1 for i in txn.instances if i.state.value == "committed")
        latency = f"{txn.report_latency_s:.2f}" if txn.report_latency_s is not None else "-"
        follow_up = f"{txn.follow_up.value}: {txn.follow_up_detail}" if txn.follow_up.value else "-"
        typer.echo(
            f"{txn.transaction_uid}\t{txn.job_id if txn.job_id is not None else '-'}\t{txn.destination}"
            f"\t{txn.state.value}\t{len(txn.instances)}\t{committed}\t{latency}\t{txn.detail}"
            f"\t{txn.attempt}\t{follow_up}"
        )


@app.command()
def status(config: ConfigOption = None) -> None:
    """At a glance: database, broker, spool, model bundles (what /readyz checks), and the jobs.

    Exit code 1 if anything is not ready.
    """
    settings = _settings(config)
    from service.db import Database
    from service.health import model_bundles_check, process_checks
    from service.observe import ServiceStateCollector
    from service.storage import Spool

    try:
        db = Database(settings.database_url, migrate=False)
    except Exception as exc:
        typer.echo(f"database\tPROBLEM\t{type(exc).__name__}: {exc}")
        raise typer.Exit(1) from exc
    names = ["database", "broker", "spool", "models"]
    problems = 0
    for name, check in zip(names, [*process_checks(settings, db), model_bundles_check(settings)], strict=True):
        problem = check()
        problems += bool(problem)
        typer.echo(f"{name}\t{'PROBLEM' if problem else 'ok'}\t{problem}".rstrip())
    if not problems:
        from service.db import JobStore

        collector = ServiceStateCollector(JobStore(db), Spool(settings.spool_dir),
                                          missing_result_after_s=settings.metrics.missing_result_after_s)
        for family in collector.collect():
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sample.labels.items())
                typer.echo(f"{sample.name}{'{' + labels + '}' if labels else ''}\t{sample.value:g}")
    db.dispose()
    raise typer.Exit(1 if problems else 0)


@app.command()
def gc(
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
) -> None:
    """Remove finished studies' files from the spool after their retention (retention.delivered_days,
    retention.failed_days). Never touches a study with a job received, queued, running, held,
    retrying, or with a Storage Commitment still pending. The database keeps every job's history."""
    settings = _settings(config)
    from service.db import Database, JobStore
    from service.db.commitment import CommitmentStore
    from service.retention import remove_orphans, sweep
    from service.storage import Spool

    db = Database(settings.database_url)
    store, spool = JobStore(db), Spool(settings.spool_dir)
    removed = sweep(store, CommitmentStore(db), spool, settings.retention, dry_run=dry_run)
    orphans = remove_orphans(store, spool, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for item in removed:
        typer.echo(f"{verb}\t{item.study_instance_uid}\t{item.outcome}\t"
                   f"{item.finished_at.isoformat(timespec='seconds')}\t{item.bytes_freed}")
    typer.echo(f"{verb} {len(removed)} studies, {sum(i.bytes_freed for i in removed) / 2**20:.1f} MiB; "
               f"{len(orphans)} unrecorded files (written, never recorded: a crash or a database fault)")


@app.command()
def retry(job_id: int, config: ConfigOption = None) -> None:
    """Queue a failed job again (re-runs inference and delivery)."""
    settings = _settings(config)
    from service.db import Database, JobStore
    from service.worker.app import dispatcher

    store = JobStore(Database(settings.database_url))
    if not store.retry(job_id):
        typer.echo(f"job {job_id} is not in state failed; nothing to retry", err=True)
        raise typer.Exit(1)
    dispatcher(settings)(job_id)
    typer.echo(f"job {job_id} queued")


@app.command()
def release(job_id: int, config: ConfigOption = None) -> None:
    """Deliver a held job: a result outside the validated range that the site policy
    (assess.outside_range_policy: hold) kept back. It is sent as it was written,
    flagged outside the validated range in the SR and the overlay."""
    settings = _settings(config)
    from service.db import Database, JobStore
    from service.worker.app import dispatcher

    store = JobStore(Database(settings.database_url))
    job = store.job(job_id)
    if job is None or job.state.value != "held":
        typer.echo(f"job {job_id} is not in state held; nothing to release", err=True)
        raise typer.Exit(1)
    newer = store.newer_delivered(job_id)
    if newer is not None:
        typer.echo(
            f"job {job_id} not released: job {newer} already delivered a newer result of "
            "this study",
            err=True,
        )
        raise typer.Exit(1)
    if not store.release(job_id, f"released by operator ({os.environ.get('USER', 'unknown')})"):
        typer.echo(f"job {job_id} is not in state held; nothing to release", err=True)
        raise typer.Exit(1)
    dispatcher(settings)(job_id)
    typer.echo(f"job {job_id} released and queued for delivery")


# train / finetune / export / evaluate: defined in models.cli, torch imported only when run.
from models.cli import register as _register_model_commands  # noqa: E402

_register_model_commands(app)


@app.command("db-upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or migrate the database schema (alembic) and exit."""
    settings = _settings(config)
    from service.db import Database

    Database(settings.database_url).dispose()
    typer.echo("database schema is up to date")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
