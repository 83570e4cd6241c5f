"""Retention: remove a finished study's files from the spool once nobody can need them.

Without it the spool only grows until the disk guard (``scp.min_free_mb``) refuses new
images. A study goes when every one of its jobs is finished for good
(:meth:`JobStore.finished_studies`: delivered, refused, or failed with no retry due; never
received, queued, running, held or retrying), when no Storage Commitment of it is still
pending, and when its last job ended longer ago than the retention of its outcome:
``retention.delivered_days`` when the last job was delivered, ``retention.failed_days``
(longer) when it was refused or failed. Its received images and every job's result folder
are deleted; the database keeps the jobs, deliveries, commitments and an event saying the
files were removed. Run by ``strokeseg gc`` and, every ``retention.sweep_every_s``, by the
SCP process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from service.config import RetentionSettings
from service.db import JobStore
from service.db.commitment import CommitmentStore, DestinationState
from service.db.models import utcnow
from service.domain import JobState
from service.storage import Spool, remove_tree_durably, safe_component

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Removal:
    """One study whose files retention removed (or, in a dry run, would remove)."""

    study_instance_uid: str
    outcome: str  # the last job's state
    finished_at: datetime
    bytes_freed: int


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def sweep(
    store: JobStore,
    commitments: CommitmentStore,
    spool: Spool,
    settings: RetentionSettings,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> list[Removal]:
    """Remove every study that is due; returns what was (or would be) removed."""
    now = now or utcnow()
    removed: list[Removal] = []
    for study_uid, jobs in store.finished_studies():
        last = max(jobs, key=lambda j: (j.finished_at or now, j.id))
        keep_days = settings.delivered_days if last.state is JobState.DELIVERED else settings.failed_days
        assert last.finished_at is not None  # finished_studies() lists finished jobs only
        if now - last.finished_at < timedelta(days=keep_days):
            continue
        states = commitments.destination_states([j.id for j in jobs])
        if any(d.state is DestinationState.PENDING for ds in states.values() for d in ds):
            continue  # the PACS has not confirmed yet: a re-send may still need the files
        folders = [spool.incoming / safe_component(study_uid)]
        folders += [spool.results / str(j.id) for j in jobs]
        if not store.instance_paths(study_uid) and not any(f.exists() for f in folders):
            continue  # removed by an earlier sweep
        freed = sum(_size(f) for f in folders)
        removed.append(Removal(study_uid, last.state.value, last.finished_at, freed))
        if dry_run:
            continue
        for folder in folders:  # the files first (durably), then the rows: never a row without its file
            remove_tree_durably(folder)
        store.forget_instances(
            study_uid, f"spool files removed after retention ({keep_days:g} days after {last.state.value})"
        )
        log.info("retention: removed a %s study's files (%d bytes)", last.state.value, freed)
    return removed


#: A received file this old that the database does not know is an orphan: the SCP process
#: died (or the database failed) between writing it and recording it, and the sender, which
#: got no Success, has sent it again or will.
ORPHAN_AFTER_S = 3600.0


def remove_orphans(store: JobStore, spool: Spool, *, now_s: float | None = None,
                   older_than_s: float = ORPHAN_AFTER_S, dry_run: bool = False) -> list[Path]:
    """Remove received files that no instance row references (and temp files left by a crash)."""
    import time

    if not spool.incoming.is_dir():
        return []
    now_s = time.time() if now_s is None else now_s
    known = store.recorded_paths()
    orphans = [
        path for path in spool.incoming.rglob("*")
        if path.is_file() and str(path) not in known and now_s - path.stat().st_mtime > older_than_s
    ]
    for path in orphans if not dry_run else []:
        path.unlink(missing_ok=True)
        log.warning("retention: removed an unrecorded file from the spool (%s)", path.name)
    return orphans
