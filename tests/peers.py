"""Real processes for end-to-end tests: strokeseg itself, dcmtk storescp as the PACS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import yaml

from tests.conftest import REPO, dcmtk_tool, free_port


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def echo_ok(port: int, called: str = "STROKESEG") -> bool:
    return (
        subprocess.run(
            [dcmtk_tool("echoscu"), "-aet", "TESTER", "-aec", called, "127.0.0.1", str(port)],
            capture_output=True,
            timeout=30,
        ).returncode
        == 0
    )


def storescu(port: int, folder: Path, called: str = "STROKESEG") -> None:
    result = subprocess.run(
        [dcmtk_tool("storescu"), "-aet", "MRI1", "-aec", called, "-pdu", "131072",
         "+sd", "+r", "127.0.0.1", str(port), str(folder)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


class StoreSCP:
    """dcmtk's storescp as the receiving PACS, writing into ``folder``."""

    def __init__(self, folder: Path, port: int | None = None, ae_title: str = "PACS") -> None:
        self.folder = folder
        self.port = port or free_port()
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk_tool("storescp"), "-aet", self.ae_title, "-od", str(self.folder), "-pdu", "131072",
             "--accept-all", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: echo_ok(self.port, self.ae_title), 20, "storescp to listen")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def destination(self, name: str = "pacs") -> dict[str, Any]:
        return {"name": name, "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}


class Strokeseg:
    """``strokeseg <command> --config FILE`` as a subprocess."""

    def __init__(self, command: str, config: Path, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.command = command
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.log = log or config.with_suffix(f".{command}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Strokeseg:
        self._log_fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", self.command, "--config", str(self.config)],
            cwd=REPO, env=self.env, stdout=self._log_fh, stderr=subprocess.STDOUT,
        )
        return self

    def stop(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"strokeseg {self.command} did not stop on SIGINT") from None
        self._log_fh.close()
        return int(self.proc.returncode)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def __enter__(self) -> Strokeseg:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def write_config(path: Path, *, scp_port: int, spool: Path, destinations: list[dict[str, Any]],
                 completion_timeout_s: float = 2.0, incomplete_extra_wait_s: float = 1.0,
                 **extra: Any) -> Path:
    config = {
        "scp": {"ae_title": "STROKESEG", "host": "127.0.0.1", "port": scp_port},
        "study": {"completion_timeout_s": completion_timeout_s,
                  "incomplete_extra_wait_s": incomplete_extra_wait_s},
        "destinations": destinations,
        "spool_dir": str(spool),
        "worker": {"intra_op_threads": 2},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


# -- checking what came back ---------------------------------------------------------

def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dicom3tools' ``dciodvfy -new`` output that report an error."""
    exe = "/usr/bin/dciodvfy"
    if not os.access(exe, os.X_OK):
        raise AssertionError("dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")
    result = subprocess.run([exe, "-new", str(path)], capture_output=True, timeout=60)
    # dciodvfy echoes offending values byte for byte; they need not be UTF-8.
    text = (result.stdout + result.stderr).decode("latin-1")
    return [line for line in text.splitlines() if "Error" in line]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


def sent_high_b_uids(case_dir: Path) -> list[str]:
    """SOPInstanceUIDs of the b >= 500 images of a phantom case, in truth-mask slice order."""
    items = []
    for path in (case_dir / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if float(ds.get("DiffusionBValue", 0) or 0) >= 500 and "ADC" not in ds.ImageType:
            iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
            normal = np.cross(iop[:3], iop[3:])
            items.append((float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal),
                          str(ds.SOPInstanceUID)))
    return [uid for _, uid in sorted(items)]


def seg_mask_in_truth_order(seg: pydicom.Dataset, slice_uids: list[str]) -> np.ndarray:
    """The SEG's segment-1 mask as (slices, rows, cols) aligned to ``slice_uids``."""
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    mask = np.zeros((len(slice_uids), int(seg.Rows), int(seg.Columns)), dtype=bool)
    index = {uid: i for i, uid in enumerate(slice_uids)}
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ident = item if "SegmentIdentificationSequence" in item else shared
        if int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != 1:
            continue
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        mask[index[str(source)]] |= frame.astype(bool)
    return mask
