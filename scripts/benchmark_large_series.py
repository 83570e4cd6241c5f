#!/usr/bin/env python3
"""Seconds to segment one large study (e.g. a Philips classic series of 1,400-2,000 files).

    .venv/bin/python scripts/benchmark_large_series.py DICOM_DIR [--repeats 3] [--serve]

Prints one JSON object:

* ``files``: DICOM files under DICOM_DIR (one study);
* ``read_s``: ``service.intake.reading.read_planes`` with one reader process and with the
  default (one per core), median over ``--repeats``; parsing every header is the cost
  that grows with the file count;
* ``load_study_s``: the whole intake (read, classify, stack, trace, ADC), default readers;
* ``segment_files_s``: intake + preprocessing + network + assessment + SEG + SR, in-process;
* ``cli_segment_s``: ``strokeseg segment DICOM_DIR`` as a user runs it (process start,
  model load, grouping by study, the above, writing files), wall clock;
* with ``--serve``: ``e2e_s``: ``strokeseg serve`` receives the study from dcmtk's
  ``storescu`` (one association) and sends SEG + SR to a dcmtk ``storescp``; the figure is
  the time from storescu's exit (last image acknowledged) to both objects on the
  storescp's disk, with ``completion_timeout_s`` = ``--completion-timeout`` (a fixed wait
  that is part of the figure); ``send_s`` is storescu's own time.

The issue-10 target is <= 10 s for 1,400-2,000 files on 2 cores (``cli_segment_s``).
Run it on an otherwise idle machine; pin to two cores with ``taskset -c 0,1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _median_time(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 2)


def _in_process(files: list[Path], repeats: int) -> dict[str, Any]:
    from service.config import Settings
    from service.intake.reading import default_readers, read_planes
    from service.intake.study import load_study
    from service.pipeline import model_router, segment_files

    settings = Settings()
    model = model_router(settings)
    model.preload()
    figures: dict[str, Any] = {"readers_default": default_readers()}
    figures["read_s"] = {
        "1 reader": _median_time(lambda: read_planes(files, readers=1), repeats),
        f"{default_readers()} readers": _median_time(lambda: read_planes(files), repeats),
    }
    figures["load_study_s"] = _median_time(lambda: load_study(files), repeats)
    with tempfile.TemporaryDirectory() as out:
        figures["segment_files_s"] = _median_time(
            lambda: segment_files(files, model, Path(out), settings.preprocess.profile_options(),
                                  settings.derive, assess_settings=settings.assess),
            repeats,
        )
    return figures


def _cli_segment(folder: Path, repeats: int) -> float:
    def run() -> None:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([sys.executable, "-m", "service.cli", "segment", str(folder), "--out", out],
                           cwd=ROOT, check=True, capture_output=True)
    return _median_time(run, repeats)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _echo(port: int, called: str) -> bool:
    return subprocess.run(["echoscu", "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True).returncode == 0


def _serve_e2e(folder: Path, completion_timeout_s: float) -> dict[str, float]:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pacs_dir, pacs_port, scp_port = work / "pacs", _free_port(), _free_port()
        pacs_dir.mkdir()
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({
            "scp": {"ae_title": "STROKESEG", "host": "127.0.0.1", "port": scp_port},
            "study": {"completion_timeout_s": completion_timeout_s},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                              "port": pacs_port}],
            "spool_dir": str(work / "spool"),
        }))
        pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs_dir), "--accept-all",
                                 str(pacs_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = (work / "serve.log").open("wb")
        serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(config)],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: _echo(pacs_port, "PACS"), 20, "storescp")
            _wait(lambda: _echo(scp_port, "STROKESEG"), 60, "strokeseg serve")
            started = time.perf_counter()
            subprocess.run(["storescu", "-aet", "MRI1", "-aec", "STROKESEG", "+sd", "+r",
                            "127.0.0.1", str(scp_port), str(folder)], check=True, capture_output=True)
            sent = time.perf_counter()
            _wait(lambda: len(list(pacs_dir.iterdir())) >= 2, 300, "SEG + SR at the storescp")
            done = time.perf_counter()
        finally:
            serve.send_signal(2)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve.kill()
            pacs.terminate()
            log.close()
        return {"send_s": round(sent - started, 2), "e2e_s": round(done - sent, 2),
                "completion_timeout_s": completion_timeout_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dicom_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help="also measure strokeseg serve end to end")
    parser.add_argument("--completion-timeout", type=float, default=3.0)
    args = parser.parse_args()
    files = sorted(p for p in args.dicom_dir.rglob("*") if p.is_file())
    figures: dict[str, Any] = {"folder": str(args.dicom_dir), "files": len(files),
                               "cores": len(os.sched_getaffinity(0))}
    figures.update(_in_process(files, args.repeats))
    figures["cli_segment_s"] = _cli_segment(args.dicom_dir, args.repeats)
    if args.serve:
        if not shutil.which("storescu"):
            raise SystemExit("--serve needs dcmtk (storescu, storescp, echoscu)")
        figures.update(_serve_e2e(args.dicom_dir, args.completion_timeout))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
