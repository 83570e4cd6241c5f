"""The Celery app and its one thin task.

Tasks carry only a job id; the database is the source of truth for job state.
``acks_late`` + ``reject_on_worker_lost`` re-deliver a task whose worker died;
the compare-and-set claim in the JobStore makes a second delivery harmless.

Broker for the embedded deployment: kombu's SQLAlchemy transport on a SQLite
file (``sqla+sqlite:///<spool>/broker.sqlite``).  It needs no server, works
across processes on one host (unlike ``memory://``) and does not delete a
message on read (unlike ``filesystem://``).  It has no visibility restore, so
jobs lost with a crashed worker are re-queued from the database at start-up.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready
from kombu.entity import Queue

from service import metrics
from service.config import Settings, load_settings
from service.pipeline import WorkerContext, run_job

log = logging.getLogger(__name__)

PROCESS_STUDY = "strokeseg.process_study"

_context: WorkerContext | None = None
_settings: Settings | None = None


#: How often a worker asks the embedded (SQLAlchemy) broker for a message. kombu's default for
#: polled transports is 1 s, a second of latency per study; a poll is one indexed query on
#: a small SQLite table. Redis and AMQP push messages and are not polled.
EMBEDDED_BROKER_POLL_S = 0.1


def _use_fast_polling(broker_url: str) -> None:
    """Poll the embedded broker every :data:`EMBEDDED_BROKER_POLL_S`.

    kombu reads ``polling_interval`` from the transport options, but its SQLAlchemy transport
    hands every transport option to ``create_engine()``, which refuses unknown keywords: so
    the interval is set on the transport class.
    """
    if broker_url.startswith("sqla+"):
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = EMBEDDED_BROKER_POLL_S


def _transport_options(broker_url: str) -> dict[str, Any]:
    if broker_url.startswith(("redis", "rediss", "sentinel")):
        # Longer than the longest job, so Redis does not hand a running job to a second worker.
        return {"visibility_timeout": 4 * 3600}
    # kombu's SQLAlchemy transport passes its options to create_engine(): give it none.
    return {}


def make_celery(settings: Settings) -> Celery:
    app = Celery("strokeseg", broker=settings.broker_url, set_as_current=False)
    _use_fast_polling(settings.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.worker.queue,
        task_routes={PROCESS_STUDY: {"queue": settings.worker.queue}},
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings.broker_url),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def worker_context() -> WorkerContext:
    """One context per worker process, created after fork."""
    global _context
    if _context is None:
        _context = WorkerContext.from_settings(_settings or load_settings())
    return _context


#: Set by ``strokeseg worker --pool solo``: tasks run in the main process, which no fork follows.
preload_in_main_process = False


def _preload() -> None:
    try:  # load every routed model now: warm for the first study, bad bundles found early
        for model in worker_context().router.preload():
            log.info("model %s %s warm (%s)", model.card.name, model.card.version, model.provider)
            metrics.MODEL_INFO.labels(model.card.name, model.card.version, model.provider).set(1)
    except Exception:
        log.exception("could not preload the models; jobs will report the error")


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    global _context
    _context = None  # never share DB connections or ONNX sessions across a fork
    _preload()


@worker_ready.connect
def _ready(**_: Any) -> None:
    # A prefork parent must not load models (its children would inherit ONNX Runtime's
    # threads); with the solo pool the main process is the one that runs the tasks.
    if preload_in_main_process:
        _preload()


@worker_process_shutdown.connect
def _before_exit(pid: int | None = None, **_: Any) -> None:
    from service.metrics import mark_process_dead

    mark_process_dead(pid or os.getpid())


def create_worker_app(settings: Settings) -> Celery:
    """The app with the task registered, for ``strokeseg worker``."""
    global _settings
    _settings = settings
    app = make_celery(settings)

    @app.task(name=PROCESS_STUDY, acks_late=True)
    def process_study(job_id: int) -> str | None:
        state = run_job(worker_context(), int(job_id))
        return state.value if state is not None else None

    return app


def ensure_queue(settings: Settings, attempts: int = 5) -> None:
    """Declare the worker queue on the broker before processes race to create it.

    kombu's SQLAlchemy transport creates a queue row on first use; two processes
    doing so at once (the SCP sending, the worker consuming) collide on a unique
    constraint and the loser dies.  Declaring it once up front, with a retry, avoids that.
    """
    app = make_celery(settings)
    for attempt in range(attempts):
        try:
            with app.connection_for_write() as conn:
                Queue(settings.worker.queue).bind(conn.default_channel).declare()
            return
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def dispatcher(settings: Settings) -> Any:
    """A function that sends a job id to the worker queue (used by the SCP process)."""
    app = make_celery(settings)

    def dispatch(job_id: int) -> None:
        app.send_task(PROCESS_STUDY, args=[int(job_id)], queue=settings.worker.queue)

    return dispatch
