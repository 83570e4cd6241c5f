"""Reading a study on several cores gives exactly what reading it in one process gives.

The parallel path is taken for large classic series (Philips/GE, 1,400-2,000 files); these
tests lower its threshold so a small synthetic study takes it, and run it from a daemonic
process as a Celery prefork child is one.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import RLELossless, generate_uid

from service.errors import UnreadableImage
from service.intake import load_study, reading
from service.intake.planes import planes_of, slim_pixel_sources
from tests.dicom_factory import make_dwi_series, write_series

N = 10


def _study(tmp_path: Path, *, study: str | None = None, truncate: int | None = None) -> list[Path]:
    study = study or generate_uid()
    frame = generate_uid()
    paths: list[Path] = []
    rng = np.random.default_rng(7)
    for b in (0.0, 1000.0):
        series = make_dwi_series(N, 32, 32, b_value=b, study_instance_uid=study,
                                 frame_of_reference_uid=frame)
        for ds in series:
            signal = 900 if b == 0 else 300
            ds.PixelData = rng.integers(signal - 50, signal + 50, (32, 32), dtype=np.uint16).tobytes()
        if truncate is not None and b == 1000.0:
            series[truncate].PixelData = series[truncate].PixelData[:100]
        paths += write_series(series, tmp_path / f"{study[-6:]}-b{int(b)}")
    junk = tmp_path / "README.txt"
    junk.write_text("not DICOM")
    return [*paths, junk]


@pytest.fixture
def parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the parallel path for any study size."""
    monkeypatch.setattr(reading, "PARALLEL_MIN_FILES", 1)


def _describe(planes: list) -> list[tuple]:  # type: ignore[type-arg]
    return [
        (p.source.sop_instance_uid, p.source.path, p.role, p.b_value, p.series_instance_uid,
         None if p.geometry is None else tuple(p.geometry.position))
        for p in planes
    ]


def test_parallel_read_equals_serial(tmp_path: Path, parallel: None) -> None:
    paths = _study(tmp_path)
    serial = reading.read_planes(paths, readers=1)
    pooled = reading.read_planes(list(reversed(paths)), readers=3)
    assert len(serial) == 2 * N
    assert _describe(pooled) == _describe(serial)
    for a, b in zip(serial, pooled, strict=True):
        np.testing.assert_array_equal(a.values(), b.values())


def test_parallel_load_study_equals_serial(tmp_path: Path, parallel: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _study(tmp_path)
    pooled = load_study(paths)
    monkeypatch.setattr(reading, "PARALLEL_MIN_FILES", 10**9)
    serial = load_study(paths)
    np.testing.assert_array_equal(pooled.dwi.voxels, serial.dwi.voxels)
    np.testing.assert_array_equal(pooled.adc.voxels, serial.adc.voxels)
    assert pooled.dwi_sources == serial.dwi_sources


def test_parallel_read_names_the_corrupt_file(tmp_path: Path, parallel: None) -> None:
    paths = _study(tmp_path, truncate=4)
    with pytest.raises(UnreadableImage, match=r"unreadable pixel data in series \d+ instance 5 \(file "):
        load_study(paths)


def test_group_by_study_parallel_equals_serial(tmp_path: Path, parallel: None) -> None:
    first, second = generate_uid(), generate_uid()
    paths = _study(tmp_path / "a", study=first) + _study(tmp_path / "b", study=second)
    pooled = reading.group_by_study(paths, readers=2)
    serial = reading.group_by_study(paths, readers=1)
    assert pooled == serial
    assert set(pooled) == {first, second}
    assert all(len(v) == 2 * N for v in pooled.values())  # the README.txt files are skipped


def test_slim_sources_decode_the_same_pixels(tmp_path: Path) -> None:
    """The slimmed pixel module still decodes, compressed transfer syntaxes included."""
    series = make_dwi_series(3, 32, 32, b_value=1000.0, study_instance_uid=generate_uid(),
                             frame_of_reference_uid=generate_uid())
    for ds in series:
        ds.PixelData = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32).tobytes()
        ds.compress(RLELossless)  # pydicom's own encoder; decoding needs the transfer syntax
    paths = write_series(series, tmp_path / "s")
    full = [plane for path in paths for plane in planes_of(path, dcmread(path))]
    slim = reading.read_planes(paths, readers=1)  # slimmed as each file is read
    assert all(len(p.pixels.cache._ds) < 15 for p in slim if p.pixels is not None)  # type: ignore[attr-defined]
    for a, b in zip(full, slim, strict=True):
        np.testing.assert_array_equal(a.values(), b.values())
    slim_pixel_sources(slim)  # a second slimming is harmless
    np.testing.assert_array_equal(slim[1].values(), full[1].values())
    np.testing.assert_array_equal(slim[0].stored_values(), np.arange(32 * 32).reshape(32, 32))


def _pool_from_daemon(paths: list[Path], queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    reading.PARALLEL_MIN_FILES = 1
    result = reading._pool_map(reading._study_uids_of_chunk, reading._chunks(sorted(paths), 2))
    queue.put(None if result is None else sum(len(chunk) for chunk in result))


def test_pool_starts_inside_a_daemonic_process(tmp_path: Path) -> None:
    """A Celery prefork child is daemonic; multiprocessing would refuse it children."""
    paths = _study(tmp_path)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_pool_from_daemon, args=(paths, queue), daemon=True)
    child.start()
    read = queue.get(timeout=60)
    child.join(timeout=30)
    assert read == len(paths)  # the pool ran (None would mean the in-process fallback)
