"""Hold-back of results outside the validated range (issue #9): held, listed, released.

An out-of-range study is made cheaply and deterministically with a config
whose validated b-value range excludes the phantom's b=1000.  The worker's
``run_job`` runs in-process (the broker is not needed to test the policy);
``strokeseg jobs``, ``retry`` and ``release`` run as the operator would run
them, against the same SQLite database; dcmtk's storescp is the PACS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from service.config import load_settings
from service.derive import read_lesion_findings
from service.domain import JobState
from service.pipeline import WorkerContext, run_job
from tests.conftest import free_port
from tests.peers import StoreSCP, run_cli, write_config

pytestmark = pytest.mark.network

SR_UID = "1.2.840.10008.5.1.4.1.1.88.34"
OUTSIDE_B = "b=1000 s/mm2 outside the validated 1500-3000"


def _receive_study(ctx: WorkerContext, case: Path) -> int:
    """Record the phantom's files as the SCP would and queue the study's job."""
    job_ids = set()
    for path in sorted((case / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        job_ids.add(
            ctx.store.record_instance(
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                path=str(path),
                size_bytes=path.stat().st_size,
                calling_ae_title="MRI1",
            )
        )
    (job_id,) = job_ids
    assert ctx.store.complete_studies(idle_s=0) == [job_id]
    return job_id


def _jobs(config: Path) -> dict[str, list[str]]:
    result = run_cli(config, "jobs")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split("\t")[-1] == "validity"
    return {row.split("\t")[0]: row.split("\t") for row in rows}


def test_hold_policy_keeps_an_out_of_range_result_until_released(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    case = phantom_cases[0]
    study_uid = json.loads((case / "truth" / "truth.json").read_text())["study_instance_uid"]
    with StoreSCP(tmp_path / "pacs") as peer:
        config = write_config(
            tmp_path / "strokeseg.yaml",
            scp_port=free_port(),
            spool=tmp_path / "spool",
            destinations=[peer.destination()],
            assess={"outside_range_policy": "hold", "validity": {"b_value_range": [1500, 3000]}},
        )
        ctx = WorkerContext.from_settings(load_settings(config))
        try:
            job_id = _receive_study(ctx, case)
            assert run_job(ctx, job_id) is JobState.HELD

            summary = ctx.store.job(job_id)
            assert summary is not None and summary.state is JobState.HELD
            assert summary.reason.startswith(f"held: outside validated range ({OUTSIDE_B}")
            assert summary.reason.endswith(f"); release with `strokeseg release {job_id}`")
            assert summary.validity == "outside" and OUTSIDE_B in summary.validity_reasons
            assert summary.lesion_volume_ml is not None
            # nothing sent, but the results are written (and say they are out of range)
            assert peer.received() == [] and ctx.store.deliveries(job_id) == []
            written = sorted(Path(summary.result_dir).glob("*.dcm"))
            (sr_path,) = [p for p in written if p.name.startswith("SR_")]
            reported = read_lesion_findings(pydicom.dcmread(sr_path))
            assert reported.validity_status == "outside"
            assert OUTSIDE_B in reported.validity_reasons

            row = _jobs(config)[str(job_id)]
            assert row[1] == "held" and row[6] == summary.reason
            assert row[-1].startswith("OUTSIDE: ") and OUTSIDE_B in row[-1]
            # `retry` is for failed deliveries; a held result needs a deliberate release
            assert run_cli(config, "retry", str(job_id)).returncode == 1

            released = run_cli(config, "release", str(job_id))
            assert released.returncode == 0, released.stderr
            assert f"job {job_id} released" in released.stdout
            summary = ctx.store.job(job_id)
            assert summary is not None and summary.state is JobState.QUEUED
            assert summary.released_at is not None

            # the worker picks the released job up and delivers what the held attempt wrote
            assert run_job(ctx, job_id) is JobState.DELIVERED
            received = [ds for ds in peer.received() if str(ds.StudyInstanceUID) == study_uid]
            assert {str(ds.SOPInstanceUID) for ds in received} == {
                p.stem.split("_", 1)[1] for p in written
            }
            (sr,) = [ds for ds in received if ds.SOPClassUID == SR_UID]
            assert read_lesion_findings(sr).validity_status == "outside"
            row = _jobs(config)[str(job_id)]
            assert row[1] == "delivered" and row[-1].startswith("OUTSIDE: ")
            assert [state for state, _, _ in ctx.store.events(job_id)][-4:] == [
                "held", "queued", "running", "delivered",
            ]
            # released once; a delivered job cannot be released again
            assert run_cli(config, "release", str(job_id)).returncode == 1
        finally:
            ctx.db.dispose()


def test_deliver_policy_sends_an_out_of_range_result_flagged(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    config = write_config(
        tmp_path / "strokeseg.yaml",
        scp_port=free_port(),
        spool=tmp_path / "spool",
        destinations=[],
        assess={"validity": {"b_value_range": [1500, 3000]}},  # policy: deliver (default)
    )
    ctx = WorkerContext.from_settings(load_settings(config))
    try:
        job_id = _receive_study(ctx, phantom_cases[1])
        assert run_job(ctx, job_id) is JobState.DELIVERED  # kept in the spool: no destinations
        summary = ctx.store.job(job_id)
        assert summary is not None and summary.validity == "outside"
        assert OUTSIDE_B in summary.validity_reasons
        row = _jobs(config)[str(job_id)]
        assert row[1] == "delivered" and OUTSIDE_B in row[-1]
    finally:
        ctx.db.dispose()


def test_run_job_times_every_stage_and_logs_the_breakdown(
    tmp_path: Path, phantom_cases: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14: ``strokeseg_stage_seconds{stage}`` and one log line per job say where the time went."""
    from prometheus_client import REGISTRY

    def count(stage: str) -> float:
        return REGISTRY.get_sample_value("strokeseg_stage_seconds_count", {"stage": stage}) or 0.0

    stages = ("read", "intake", "preprocess", "inference", "assess", "sources", "seg", "sr", "write", "deliver")
    before = {stage: count(stage) for stage in stages}
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(tmp_path / "strokeseg.yaml", scp_port=free_port(), spool=tmp_path / "spool",
                              destinations=[pacs.destination()])
        ctx = WorkerContext.from_settings(load_settings(config))
        try:
            job_id = _receive_study(ctx, phantom_cases[0])
            with caplog.at_level("INFO", logger="service.pipeline"):
                assert run_job(ctx, job_id) is JobState.DELIVERED
        finally:
            ctx.db.dispose()
    assert {stage: count(stage) - before[stage] for stage in stages} == dict.fromkeys(stages, 1.0)
    line = next(r.getMessage() for r in caplog.records if "from claim to delivered" in r.getMessage())
    assert all(f"{stage} " in line for stage in stages)
