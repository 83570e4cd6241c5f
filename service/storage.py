"""The spool: received instances and produced results on disk, written durably.

Layout under ``spool_dir``::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    results/<job id>/<kind>_<SOPInstanceUID>.dcm

A write is: temp file in the target folder, write, fsync, atomic rename,
fsync of the folder.  Only after that may the SCP answer C-STORE Success.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

_UID_SAFE = re.compile(r"[^0-9A-Za-z.\-]")


def safe_component(uid: str) -> str:
    """A UID as a file-name component (UIDs are digits and dots; anything else is replaced)."""
    cleaned = _UID_SAFE.sub("_", uid.strip())[:128]
    if not cleaned or cleaned in (".", ".."):
        raise ValueError(f"unusable identifier for a file name: {uid!r}")
    return cleaned


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree_durably(folder: Path) -> None:
    """Remove ``folder`` with everything in it, and make the removal survive a power loss.

    The start-up sweep records every spool file the database does not know
    (:func:`service.recovery.record_unrecorded_instances`), so a removal that a power loss
    took back would bring a study's files back as newly received.
    """
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.is_dir():
        _fsync_dir(folder.parent)


def make_dirs_durably(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each made durable by an fsync of its parent.

    A new study or series folder is an entry in its parent directory; until that
    directory is fsync'd, a power loss can forget the folder and every file in it,
    even files that were themselves fsync'd.
    """
    missing: list[Path] = []
    current = folder
    while not current.is_dir():
        missing.append(current)
        current = current.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:  # another thread made it: its fsync covers it, ours does no harm
            pass
        _fsync_dir(new.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half."""
    make_dirs_durably(path.parent)
    # A temp name unique to this thread (O_EXCL guards it): cheaper than tempfile.mkstemp,
    # which matters on the C-STORE path.
    tmp_name = path.parent / f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}.part"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp_name, flags, 0o644)
    except FileExistsError:  # left by a crashed process that had our pid and thread id
        os.unlink(tmp_name)
        fd = os.open(tmp_name, flags, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class Spool:
    """Paths and durable writes under one spool directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.results = root / "results"

    def free_bytes(self) -> int:
        """Free bytes for us on the spool's file system (the nearest existing folder's)."""
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return int(shutil.disk_usage(folder).free)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (
            self.incoming
            / safe_component(study_uid)
            / safe_component(series_uid)
            / f"{safe_component(sop_uid)}.dcm"
        )

    def store_instance(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Durably store one received instance (the received bytes, not a re-encoding)."""
        path = self.instance_path(study_uid, series_uid, sop_uid)
        atomic_write(path, data)
        return path

    def result_dir(self, job_id: int) -> Path:
        folder = self.results / str(int(job_id))
        make_dirs_durably(folder)
        return folder
