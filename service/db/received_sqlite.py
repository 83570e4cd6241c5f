"""The C-STORE's one transaction on SQLite, in plain SQL on the driver's connection.

:meth:`service.db.store.JobStore.record_received` runs once per received image, between the
file's fsync and the C-STORE answer. On SQLite (the embedded default) SQLAlchemy's own work
per statement (parameter processing, result wrapping, the pool's transaction bookkeeping) was
the largest cost left on that path: measured on the test machine, the same statements through
the driver made the SCP's receive of 300 images 0.3-0.4 s faster. The statements are the
ones of the Core path (:func:`service.db.store._record_received`), which PostgreSQL keeps;
``tests/test_db.py`` checks that both write the same rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Engine

from service.domain import InstanceSignature, JobState

_INSTANCE_COLUMNS = (
    "study_instance_uid", "series_instance_uid", "sop_class_uid", "path", "size_bytes", "received_at",
    "calling_ae_title", "role", "b_value", "slice_position", "frames",
)
_TOUCH_STUDY = "UPDATE studies SET last_received_at = ? WHERE study_instance_uid = ?"
_NEW_STUDY = ("INSERT INTO studies (study_instance_uid, first_received_at, last_received_at, calling_ae_title) "
              "VALUES (?, ?, ?, ?)")
_PREVIOUS_PATH = "SELECT path FROM instances WHERE sop_instance_uid = ?"
_NEW_INSTANCE = (f"INSERT INTO instances ({', '.join(_INSTANCE_COLUMNS)}, sop_instance_uid) "
                 f"VALUES ({', '.join('?' * (len(_INSTANCE_COLUMNS) + 1))})")
_REPLACE_INSTANCE = (f"UPDATE instances SET {', '.join(f'{c} = ?' for c in _INSTANCE_COLUMNS)} "
                     "WHERE sop_instance_uid = ?")
_OPEN_JOB = "SELECT id FROM jobs WHERE study_instance_uid = ? AND state = ? LIMIT 1"
_NEW_JOB = ("INSERT INTO jobs (study_instance_uid, state, reason, created_at, updated_at, attempts, "
            "model_name, model_version, result_dir) VALUES (?, ?, '', ?, ?, 0, '', '', '')")
_NEW_EVENT = "INSERT INTO job_events (job_id, state, reason, at) VALUES (?, ?, '', ?)"


def timestamp_writer(engine: Engine) -> Callable[[datetime], Any]:
    """How SQLAlchemy stores a ``DateTime`` on this engine's SQLite (so both paths agree)."""
    processor = DateTime().dialect_impl(engine.dialect).bind_processor(engine.dialect)
    assert processor is not None
    return processor


def record_received_sqlite(
    engine: Engine, store_time: Callable[[datetime], Any], *,
    study_uid: str, series_uid: str, sop_uid: str, sop_class_uid: str, path: str, size_bytes: int,
    calling_ae_title: str, signature: InstanceSignature | None, now: datetime,
) -> tuple[int, str | None]:
    """(the study's open job id, where this SOP Instance UID was stored before or None)."""
    at = store_time(now)
    sig = signature or InstanceSignature(series_uid)
    row = (study_uid, series_uid, sop_class_uid, path, size_bytes, at, calling_ae_title,
           sig.role.value, sig.b_value, sig.slice_position, sig.frames, sop_uid)
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        # IMMEDIATE: the write lock up front, waiting (busy_timeout) for another writer.
        cursor.execute("BEGIN IMMEDIATE")
        try:
            if cursor.execute(_TOUCH_STUDY, (at, study_uid)).rowcount == 0:
                cursor.execute(_NEW_STUDY, (study_uid, at, at, calling_ae_title))
            previous = cursor.execute(_PREVIOUS_PATH, (sop_uid,)).fetchone()
            cursor.execute(_NEW_INSTANCE if previous is None else _REPLACE_INSTANCE, row)
            job = cursor.execute(_OPEN_JOB, (study_uid, JobState.RECEIVED.value)).fetchone()
            if job is None:
                cursor.execute(_NEW_JOB, (study_uid, JobState.RECEIVED.value, at, at))
                job_id = int(cursor.lastrowid or 0)
                cursor.execute(_NEW_EVENT, (job_id, JobState.RECEIVED.value, at))
            else:
                job_id = int(job[0])
            cursor.execute("COMMIT")
        except BaseException:
            try:
                cursor.execute("ROLLBACK")
            except sqlite3.Error:  # the failure already ended the transaction
                pass
            raise
        return job_id, None if previous is None else str(previous[0])
    finally:
        connection.close()
