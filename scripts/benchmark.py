#!/usr/bin/env python3
"""strokeseg's performance figures (issue 14) in one run; prints one JSON object.

    .venv/bin/python scripts/benchmark.py [--rounds 3] [--studies 20] [--quick]

* ``ingest``: dcmtk's ``storescu`` sends ``--images`` MR images (256 x 256, 16 bit: 300 are
  ~40 MB) over one association, alternately to pynetdicom's own ``storescp`` app (the
  baseline, ``python -m pynetdicom storescp PORT -od DIR``, with the same unlimited receive
  PDU as strokeseg's default ``scp.max_pdu_size: 0``) and to ``strokeseg serve`` (every image
  fsync'd and recorded in the database before Success); ``--rounds`` rounds each, receivers
  started fresh per round, start-up not timed. ``ratio`` = median strokeseg / median baseline
  (target <= 1.0). Every image is checked to have arrived at both.
* ``e2e``: ``strokeseg serve`` with the default settings (content-aware completion) sends
  SEG + SR to a dcmtk ``storescp``; ``--studies`` phantom studies (``strokeseg phantom``) are
  sent one after the other, each over one association; per study, the time from
  ``storescu``'s exit (the last image acknowledged) to both objects on the storescp's disk.
  p50 / p95 (targets <= 4 s / <= 6 s), and from the job database where that time went:
  last image -> queued (completion), queued -> claimed (hand-off and pick-up), claimed ->
  delivered (``worker_s``, target <= 1.5 s for ~25 slices).
* ``stages``: the worker's ``strokeseg_stage_seconds`` histogram scraped from its ``/metrics``
  after the run: mean seconds per study for each stage (read, intake, preprocess, inference,
  assess, seg, sr, overlay, deliver, ...).
* ``worker_peak_rss_mb``: the peak RSS (``VmHWM``) of the worker process and its children.
* ``machine``: cores, CPU model, load average before and after (measure on a quiet machine:
  the script warns when a ``pytest`` runs).

``--quick`` runs tiny sizes (a smoke test of the harness; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PDU = "131072"  # dcmtk's storescu sends PDUs of at most this (see STACK-NOTES: loopback trap)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def _echo(port: int, called: str) -> bool:
    return subprocess.run(["echoscu", "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True).returncode == 0


def _storescu(port: int, folder: Path, called: str) -> float:
    """Seconds storescu takes to send ``folder`` over one association (it fails loudly)."""
    started = time.perf_counter()
    result = subprocess.run(["storescu", "-aet", "MRI1", "-aec", called, "-pdu", PDU, "+sd", "+r",
                             "127.0.0.1", str(port), str(folder)], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stdout}{result.stderr}")
    return elapsed


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(2)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _write_config(path: Path, settings: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(settings))
    return path


@contextmanager
def _serve(work: Path, extra: dict[str, Any]) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``strokeseg serve`` on a fresh spool; yields its DICOM port once it answers C-ECHO."""
    port = _free_port()
    config = _write_config(work / "strokeseg.yaml", {
        "scp": {"ae_title": "STROKESEG", "host": "127.0.0.1", "port": port},
        "spool_dir": str(work / "spool"), **extra,
    })
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen([PYTHON, "-m", "service.cli", "serve", "--config", str(config)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _echo(port, "STROKESEG"), 120, "strokeseg serve", 0.2)
        yield port, proc
    finally:
        _stop(proc)
        log.close()


# --- ingest ------------------------------------------------------------------------------------

def _make_ingest_series(folder: Path, images: int, size: int) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.dicom_factory import make_dwi_series, write_series

    write_series(make_dwi_series(n_slices=images, rows=size, columns=size, seed=1), folder)


def _baseline_round(folder: Path, images: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-base-") as tmp:
        port, out = _free_port(), Path(tmp)
        proc = subprocess.Popen([PYTHON, "-m", "pynetdicom", "storescp", str(port), "-od", str(out),
                                 "-pdu", "0", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait(lambda: _echo(port, "ANY-SCP"), 60, "pynetdicom storescp", 0.2)
            elapsed = _storescu(port, folder, "STORESCP")
        finally:
            _stop(proc)
        received = sum(1 for p in out.iterdir() if p.is_file())
        if received != images:
            raise RuntimeError(f"baseline storescp stored {received} of {images} images")
        return elapsed


def _ready(port: int) -> bool:
    try:
        return bool(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200)
    except OSError:
        return False


def _strokeseg_round(folder: Path, images: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work, worker_port = Path(tmp), _free_port()
        with _serve(work, {"metrics": {"worker_port": worker_port}}) as (port, _):
            # A running service, as a scanner meets it: the worker has started and loaded its
            # model, so its start-up does not share the two cores with the receive.
            _wait(lambda: _ready(worker_port), 120, "the worker's /readyz", 0.2)
            elapsed = _storescu(port, folder, "STROKESEG")
        with sqlite3.connect(work / "spool" / "strokeseg.sqlite") as db:
            recorded = db.execute("select count(*) from instances").fetchone()[0]
        if recorded != images:
            raise RuntimeError(f"strokeseg recorded {recorded} of {images} images")
        return elapsed


def ingest(work: Path, rounds: int, images: int, size: int) -> dict[str, Any]:
    folder = work / "ingest"
    _make_ingest_series(folder, images, size)
    baseline: list[float] = []
    ours: list[float] = []
    for _ in range(rounds):  # alternate, so that drift in the machine hits both alike
        baseline.append(_baseline_round(folder, images))
        ours.append(_strokeseg_round(folder, images))
    b, s = statistics.median(baseline), statistics.median(ours)
    return {
        "images": images, "bytes": sum(p.stat().st_size for p in folder.iterdir()),
        "rounds": rounds,
        "baseline_pynetdicom_storescp_s": round(b, 3), "strokeseg_s": round(s, 3),
        "ratio": round(s / b, 3),
        "baseline_runs_s": [round(t, 3) for t in baseline], "strokeseg_runs_s": [round(t, 3) for t in ours],
    }


# --- end to end --------------------------------------------------------------------------------

def _phantoms(folder: Path, studies: int) -> list[Path]:
    subprocess.run([PYTHON, "-m", "service.cli", "phantom", str(folder), "--cases", str(studies),
                    "--seed", "14", "--workers", str(max(1, os.cpu_count() or 1))],
                   cwd=ROOT, check=True, capture_output=True)
    return sorted(p / "dicom" for p in folder.iterdir() if (p / "dicom").is_dir())


def _peak_rss_mb(pid: int) -> float:
    """VmHWM of ``pid`` and of each of its descendants, summed (MiB)."""
    pids, total = [pid], 0
    while pids:
        current = pids.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        total += int(match.group(1)) if match else 0
        pids += [int(c) for c in children]
    return round(total / 1024, 1)


def _worker_pid(serve_pid: int) -> int | None:
    children = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()
    for child in children:
        if "worker" in Path(f"/proc/{child}/cmdline").read_text().replace("\0", " "):
            return int(child)
    return None


def _stage_figures(metrics_port: int) -> tuple[dict[str, float], dict[str, float]]:
    """(sum, count) per stage of the worker's strokeseg_stage_seconds."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        found = re.match(r'strokeseg_stage_seconds_(sum|count)\{stage="([a-z_]+)"\} (\S+)', line)
        if found:
            (sums if found.group(1) == "sum" else counts)[found.group(2)] = float(found.group(3))
    return sums, counts


def _stage_means(metrics_port: int, jobs: int) -> dict[str, float]:
    """Mean seconds per job of each stage, once the last job's delivery is recorded."""
    _wait(lambda: _stage_figures(metrics_port)[1].get("deliver", 0) >= jobs, 30, "the last delivery", 0.1)
    sums, counts = _stage_figures(metrics_port)
    return {stage: round(sums[stage] / counts[stage], 3) for stage in sums if counts.get(stage)}


def _job_times(database: Path) -> list[dict[str, float]]:
    def seconds(a: str | None, b: str | None) -> float:
        if not a or not b:
            return float("nan")
        return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()

    with sqlite3.connect(database) as db:
        rows = db.execute(
            "select s.last_received_at, j.queued_at, j.started_at, j.finished_at, j.state "
            "from jobs j join studies s using (study_instance_uid) order by j.id").fetchall()
    return [{"completion_s": seconds(r[0], r[1]), "pickup_s": seconds(r[1], r[2]),
             "worker_s": seconds(r[2], r[3]), "delivered": float(r[4] == "delivered")} for r in rows]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 3)


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50": _percentile(values, 0.5), "p95": _percentile(values, 0.95),
            "max": round(max(values), 3)}


def e2e(work: Path, studies: int) -> dict[str, Any]:
    folders = _phantoms(work / "phantoms", studies)
    pacs_dir, pacs_port, metrics_port = work / "pacs", _free_port(), _free_port()
    pacs_dir.mkdir()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs_dir), "-pdu", PDU, "--accept-all",
                             str(pacs_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serve_dir = work / "serve"
    serve_dir.mkdir()
    latencies: list[float] = []
    try:
        _wait(lambda: _echo(pacs_port, "PACS"), 20, "storescp", 0.2)
        destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
        with _serve(serve_dir, {"destinations": [destination],
                                "metrics": {"worker_port": metrics_port}}) as (port, proc):
            _wait(lambda: _metrics_up(metrics_port), 120, "the worker's /metrics", 0.2)
            for folder in folders:
                before = len(list(pacs_dir.iterdir()))
                _storescu(port, folder, "STROKESEG")
                sent = time.perf_counter()
                _wait(lambda b=before: len(list(pacs_dir.iterdir())) >= b + 2, 120, "SEG + SR")
                latencies.append(time.perf_counter() - sent)
            stages = _stage_means(metrics_port, len(folders))
            worker = _worker_pid(proc.pid)
            rss = _peak_rss_mb(worker) if worker else float("nan")
    finally:
        pacs.terminate()
        pacs.wait()
    jobs = _job_times(serve_dir / "spool" / "strokeseg.sqlite")
    return {
        "studies": len(folders), "slices_per_study": _slices(folders),
        "last_image_to_seg_sr_s": _summary(latencies),
        "runs_s": [round(t, 3) for t in latencies],
        "delivered": int(sum(j["delivered"] for j in jobs)),
        "completion_s": _summary([j["completion_s"] for j in jobs]),
        "pickup_s": _summary([j["pickup_s"] for j in jobs]),
        "worker_s": _summary([j["worker_s"] for j in jobs]),
        # jobs are numbered in the order the studies were sent
        "worker_s_by_slices": _by_slices(folders, [j["worker_s"] for j in jobs]),
        "stages_mean_s": stages,
        "worker_peak_rss_mb": rss,
    }


def _metrics_up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return False
    return True


def _by_slices(folders: list[Path], seconds: list[float]) -> dict[str, dict[str, float]]:
    """Worker seconds summarised per high-b slice count (the target is for 25 slices)."""
    groups: dict[int, list[float]] = {}
    for folder, value in zip(folders, seconds, strict=False):
        groups.setdefault(len(list(folder.glob("DWI_*.dcm"))) // 2, []).append(value)
    return {str(n): {**_summary(values), "studies": len(values)} for n, values in sorted(groups.items())}


def _slices(folders: list[Path]) -> list[int]:
    """High-b DWI slices per study (the phantoms' DWI files hold b0 and high-b: half each)."""
    return sorted({len(list(f.glob("DWI_*.dcm"))) // 2 for f in folders})


# --- the machine ------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    busy = subprocess.run(["pgrep", "-fa", "pytest"], capture_output=True, text=True).stdout.strip()
    return {"cores": len(os.sched_getaffinity(0)), "cpu": model, "python": platform.python_version(),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3], "pytest_running": bool(busy)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="ingest rounds per receiver")
    parser.add_argument("--images", type=int, default=300, help="MR images sent in the ingest test")
    parser.add_argument("--size", type=int, default=256, help="rows = columns of those images")
    parser.add_argument("--studies", type=int, default=20, help="phantom studies in the e2e test")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the harness")
    parser.add_argument("--skip", choices=["ingest", "e2e"], action="append", default=[])
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.images, args.size, args.studies = 1, 10, 64, 1
    for tool in ("storescu", "storescp", "echoscu"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} (dcmtk) is needed")
    figures: dict[str, Any] = {"date": datetime.now().astimezone().isoformat(timespec="seconds"),
                               "command": " ".join(["scripts/benchmark.py", *(argv or sys.argv[1:])]),
                               "machine_before": machine()}
    if figures["machine_before"]["pytest_running"]:
        print("warning: a pytest is running; the figures will be slower than on a quiet machine",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="strokeseg-bench-") as tmp:
        if "ingest" not in args.skip:
            figures["ingest"] = ingest(Path(tmp), args.rounds, args.images, args.size)
        if "e2e" not in args.skip:
            figures["e2e"] = e2e(Path(tmp), args.studies)
    figures["machine_after"] = machine()
    print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
