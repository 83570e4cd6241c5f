from pathlib import Path

import pytest

from service.storage import Spool, atomic_write, safe_component


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.dcm"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["b.dcm"]


def test_failed_write_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.dcm"
    atomic_write(target, b"old")

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


def test_spool_layout_and_uid_sanitising(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.store_instance("1.2.3", "1.2.3.4", "1.2.3.4.5", b"x")
    assert path == tmp_path / "incoming" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert safe_component("../etc/passwd") == ".._etc_passwd"
    with pytest.raises(ValueError):
        safe_component("..")
