"""The `strokeseg` command line: help, phantom, segment (offline pipeline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom

from tests.conftest import REPO
from tests.dicom_factory import make_dwi_series, write_series

SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )


def test_help_lists_every_command() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    for command in ("serve", "scp", "worker", "segment", "phantom", "jobs", "retry", "release"):
        assert command in result.stdout


def test_phantom_writes_cases_with_truth(tmp_path: Path) -> None:
    result = _cli("phantom", str(tmp_path), "--cases", "2", "--seed", "5")
    assert result.returncode == 0, result.stderr
    cases = sorted(tmp_path.glob("case_*"))
    assert len(cases) == 2
    for case in cases:
        assert (case / "truth" / "mask.npy").is_file()
        truth = json.loads((case / "truth" / "truth.json").read_text())
        assert truth["study_instance_uid"]
        assert len(list((case / "dicom").rglob("*.dcm"))) >= 3 * truth["shape"][0]


def test_segment_reports_each_study_and_fails_on_refusal(tmp_path: Path, phantom_cases: list[Path]) -> None:
    inbox = tmp_path / "in"
    for case in phantom_cases[:2]:
        for f in (case / "dicom").rglob("*.dcm"):
            target = inbox / case.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    (inbox / "README.txt").write_text("not DICOM")  # must be skipped, not crash
    t1 = make_dwi_series(6, 16, 16)
    for ds in t1:
        del ds.DiffusionBValue
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    write_series(t1, inbox / "t1")
    out = tmp_path / "out"
    result = _cli("segment", str(inbox), "--out", str(out))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = dict(line.split("\t", 1) for line in result.stdout.strip().splitlines())
    assert lines[str(t1[0].StudyInstanceUID)] == "refused\tno diffusion series"
    for case in phantom_cases[:2]:
        uid = json.loads((case / "truth" / "truth.json").read_text())["study_instance_uid"]
        status, volume = lines[uid].split("\t")
        assert status == "ok" and volume.endswith(" mL")
    written = [pydicom.dcmread(p) for p in out.iterdir()]
    assert sum(ds.SOPClassUID == SEG_UID for ds in written) == 2
    assert len(written) == 4


def test_segment_all_ok_exits_zero(tmp_path: Path, phantom_cases: list[Path]) -> None:
    result = _cli("segment", str(phantom_cases[0] / "dicom"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\tok\t" in result.stdout


def test_benchmark_script_runs_its_quick_mode_and_prints_every_figure() -> None:
    """scripts/benchmark.py (issue 14) end to end on tiny sizes: the harness, not the figures."""
    assert subprocess.run([sys.executable, "scripts/benchmark.py", "--help"], cwd=REPO,
                          capture_output=True).returncode == 0
    result = subprocess.run([sys.executable, "scripts/benchmark.py", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert figures["ingest"]["ratio"] > 0 and figures["ingest"]["images"] == 10
    e2e = figures["e2e"]
    assert e2e["delivered"] == e2e["studies"] == 1
    assert e2e["worker_s"]["p50"] > 0 and e2e["worker_peak_rss_mb"] > 0
    assert {"read", "intake", "inference", "seg", "sr", "deliver"} <= set(e2e["stages_mean_s"])
