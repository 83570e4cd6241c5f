"""Writing DICOM Part 10 files so that a reader never sees half of one.

The delivery stage picks up whatever lies in the output folder; a file that
is still being written (or was cut short by a crash or a full disk) would be
sent to PACS truncated.  The bytes go through :func:`service.storage.atomic_write`
(temp file, fsync, atomic rename, fsync of the folder); re-writing the same
name replaces the file, which keeps re-runs idempotent.  Files keep
``mkstemp``'s mode 0600: they hold patient data.
"""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from service.storage import atomic_write

__all__ = ["save_atomically"]

log = logging.getLogger(__name__)


def save_atomically(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a conformant Part 10 file at ``path``, atomically.

    ``enforce_file_format=True`` makes pydicom refuse datasets without the
    File Meta Information a receiver needs, instead of writing a file that
    only some readers accept.
    """
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    path = Path(path)
    atomic_write(path, buffer.getvalue())
    log.debug("wrote %s", path.name)
    return path
