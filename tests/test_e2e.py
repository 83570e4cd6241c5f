"""End to end over real sockets: storescu -> strokeseg -> SEG + SR at a real storescp.

Covers the embedded deployment (``strokeseg serve``: SQLite + SQLite broker),
restart without loss, refusal of non-diffusion input, a destination that is
down then retried, the split deployment (``strokeseg scp`` + ``strokeseg
worker``) on the machine's real Redis and PostgreSQL, and a real Orthanc with
Storage Commitment: SEG, SR and overlays stored, committed and valid
(dciodvfy) as Orthanc holds them, and a SEG that Orthanc loses re-sent and
committed by the follow-up after a restart.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.derive import read_lesion_volume_ml
from tests.conftest import free_port
from tests.dicom_factory import make_dwi_series, write_series
from tests.orthanc import Modality, Orthanc
from tests.peers import (
    StoreSCP,
    Strokeseg,
    dciodvfy_errors,
    dice,
    echo_ok,
    run_cli,
    seg_mask_in_truth_order,
    sent_high_b_uids,
    storescu,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"
SR_UID = "1.2.840.10008.5.1.4.1.1.88.34"


def _results_for(peer: StoreSCP, study_uid: str) -> dict[str, pydicom.Dataset]:
    out = {}
    for ds in peer.received():
        if str(ds.StudyInstanceUID) == study_uid:
            out["SEG" if ds.SOPClassUID == SEG_UID else "SR" if ds.SOPClassUID == SR_UID else "?"] = ds
    return out


def _check_results(case: Path, results: dict[str, pydicom.Dataset]) -> tuple[float, float]:
    """Check SEG references, Dice and SR volume; returns (dice, relative volume error)."""
    truth = json.loads((case / "truth" / "truth.json").read_text())
    truth_mask = np.load(case / "truth" / "mask.npy")
    seg, sr = results["SEG"], results["SR"]
    slice_uids = sent_high_b_uids(case)
    referenced = {
        str(inst.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for inst in series.ReferencedInstanceSequence
    }
    assert referenced == set(slice_uids), "SEG must reference exactly the sent high-b DWI images"
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == truth["study_instance_uid"]
    assert seg.SeriesInstanceUID != sr.SeriesInstanceUID
    seg_mask = seg_mask_in_truth_order(seg, slice_uids)
    assert seg_mask.shape == truth_mask.shape
    d = dice(seg_mask, truth_mask)
    volume_ml = read_lesion_volume_ml(sr)
    voxel_ml = truth["lesion_volume_ml"] / max(int(truth_mask.sum()), 1)
    # The SR's volume is the SEG's voxel count times the voxel volume.
    if truth_mask.sum():
        assert volume_ml == pytest.approx(seg_mask.sum() * voxel_ml, rel=1e-3, abs=1e-3)
    true_ml = truth["lesion_volume_ml"]
    rel_err = abs(volume_ml - true_ml) / true_ml if true_ml > 0 else volume_ml
    return d, rel_err


def _largest_lesion_case(cases: list[Path]) -> Path:
    return max(cases, key=lambda c: json.loads((c / "truth" / "truth.json").read_text())["lesion_volume_ml"])


def _non_diffusion_study(folder: Path) -> str:
    series = make_dwi_series(8, 32, 32)
    for ds in series:
        del ds.DiffusionBValue
        if "DiffusionDirectionality" in ds:
            del ds.DiffusionDirectionality
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SeriesDescription = "t1_se_tra"
    write_series(series, folder)
    return str(series[0].StudyInstanceUID)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` carrying ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _job_lines(config: Path) -> list[list[str]]:
    result = run_cli(config, "jobs")
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.strip().splitlines()[1:]]


def test_serve_round_trip_refusal_and_restart(tmp_path: Path, phantom_cases: list[Path]) -> None:
    case = _largest_lesion_case(phantom_cases)
    study_uid = json.loads((case / "truth" / "truth.json").read_text())["study_instance_uid"]
    with StoreSCP(tmp_path / "pacs") as peer:
        port, scp_metrics, worker_metrics = free_port(), free_port(), free_port()
        config = write_config(
            tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
            destinations=[peer.destination()], completion_timeout_s=2.0,
            metrics={"scp_port": scp_metrics, "worker_port": worker_metrics},
        )
        serve = Strokeseg("serve", config).start()
        try:
            wait_for(lambda: echo_ok(port), 60, "strokeseg serve to answer C-ECHO")
            sent_at = time.monotonic()
            storescu(port, case / "dicom")
            last_image_at = time.monotonic()
            refused_uid = _non_diffusion_study(tmp_path / "t1")
            storescu(port, tmp_path / "t1")
            results = wait_for(
                lambda: (r := _results_for(peer, study_uid)) and len(r) == 2 and r, 180,
                "SEG and SR at the PACS",
            )
            send_s = last_image_at - sent_at
            latency_s = time.monotonic() - last_image_at
            d, rel_err = _check_results(case, results)
            for path in peer.folder.iterdir():
                if str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID) == study_uid:
                    assert dciodvfy_errors(path) == [], path.name
            print(
                f"serve: dice={d:.3f} volume error={rel_err:.1%} sending={send_s:.1f} s "
                f"last image sent -> SEG+SR received={latency_s:.1f} s (completion timeout 2 s)"
            )
            # The model's accuracy is held to its card by test_model_quality (60+ studies);
            # here one study must come back through the network sane: the SR volume
            # equals the SEG (checked above) and is within 25 % of the truth (measured
            # with unet2d-phantom 0.2.0 on this 7.2 mL lesion: Dice 0.900, +17.6 %).
            assert d >= 0.7
            assert rel_err <= 0.25
            wait_for(
                lambda: any(line[1] == "refused" and line[5] == refused_uid for line in _job_lines(config)),
                60, "the non-diffusion study to be refused",
            )
            jobs = {line[5]: line for line in _job_lines(config)}
            assert jobs[study_uid][1] == "delivered"
            assert jobs[refused_uid][6] == "no diffusion series"
            scp_text = _metrics(scp_metrics)
            assert _metric(scp_text, "strokeseg_instances_received_total") >= 90
            worker_text = _metrics(worker_metrics)
            assert _metric(worker_text, "strokeseg_jobs_finished_total", state="delivered") >= 1
            assert _metric(worker_text, "strokeseg_refusals_total", kind="NoDiffusionSeries") == 1
            assert _results_for(peer, refused_uid) == {}, "nothing may be sent for a refused study"
        finally:
            assert serve.stop() == 0, serve.output()
        log = serve.output()
        assert "no diffusion series" in log
        first = pydicom.dcmread(next((case / "dicom").rglob("*.dcm")), stop_before_pixels=True)
        for phi in (str(first.PatientName), str(first.PatientID), str(first.AccessionNumber)):
            assert phi not in log, "patient names/IDs must never be logged"

        # Restart without loss: a study received just before a stop is processed after restart.
        second = next(c for c in phantom_cases if c != case)
        second_uid = json.loads((second / "truth" / "truth.json").read_text())["study_instance_uid"]
        config2 = write_config(
            tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
            destinations=[peer.destination()], completion_timeout_s=30.0,
        )
        with Strokeseg("serve", config2, log=tmp_path / "serve2.log") as serve2:
            wait_for(lambda: echo_ok(port), 60, "serve to start")
            storescu(port, second / "dicom")
            assert serve2.stop() == 0
        assert _results_for(peer, second_uid) == {}
        pending = {line[5]: line[1] for line in _job_lines(config2)}
        assert pending[second_uid] == "received"
        config3 = write_config(
            tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
            destinations=[peer.destination()], completion_timeout_s=1.0,
        )
        with Strokeseg("serve", config3, log=tmp_path / "serve3.log"):
            wait_for(lambda: len(_results_for(peer, second_uid)) == 2, 180, "results after restart")


def test_destination_down_then_retry(tmp_path: Path, phantom_cases: list[Path]) -> None:
    case = phantom_cases[0]
    study_uid = json.loads((case / "truth" / "truth.json").read_text())["study_instance_uid"]
    port, pacs_port = free_port(), free_port()
    config = write_config(
        tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        completion_timeout_s=1.0,
        delivery={"retry_max_age_s": 0},  # operator retry only, in this test
    )
    with Strokeseg("serve", config):
        wait_for(lambda: echo_ok(port), 60, "serve to start")
        storescu(port, case / "dicom")
        failed = wait_for(
            lambda: [line for line in _job_lines(config) if line[1] == "failed"], 120, "job to fail"
        )
        job_id, reason = failed[0][0], failed[0][6]
        assert "unreachable" in reason and "PACS@127.0.0.1" in reason
        assert "no more automatic retries" in reason
        with StoreSCP(tmp_path / "pacs", port=pacs_port) as peer:
            result = run_cli(config, "retry", job_id)
            assert result.returncode == 0, result.stderr
            results = wait_for(
                lambda: (r := _results_for(peer, study_uid)) and len(r) == 2 and r, 120,
                "results after retry",
            )
            # The retry re-sent the objects made before the failure: same SOP Instance UIDs.
            made = {p.name.split("_", 1)[1][:-4] for p in (tmp_path / "spool" / "results" / job_id).glob("*.dcm")}
            assert {str(ds.SOPInstanceUID) for ds in results.values()} == made
            wait_for(
                lambda: any(line[0] == job_id and line[1] == "delivered" for line in _job_lines(config)),
                30, "job delivered after retry",
            )


def test_split_deployment_on_redis_and_postgresql(
    tmp_path: Path, phantom_cases: list[Path], postgres_url: str
) -> None:
    case = _largest_lesion_case(phantom_cases)
    study_uid = json.loads((case / "truth" / "truth.json").read_text())["study_instance_uid"]
    queue = f"gpu-test-{uuid.uuid4().hex[:8]}"
    with StoreSCP(tmp_path / "pacs") as peer:
        port, worker_metrics = free_port(), free_port()
        config = write_config(
            tmp_path / "split.yaml", scp_port=port, spool=tmp_path / "spool",
            destinations=[peer.destination()], completion_timeout_s=1.0,
            database_url=postgres_url, broker_url="redis://127.0.0.1:6379/9",
            metrics={"scp_port": 0, "worker_port": worker_metrics},
        )
        text = config.read_text().replace("worker:\n", f"worker:\n  queue: {queue}\n")
        config.write_text(text)
        with Strokeseg("worker", config, log=tmp_path / "worker.log") as worker, \
                Strokeseg("scp", config, log=tmp_path / "scp.log") as scp:
            wait_for(lambda: echo_ok(port), 60, "strokeseg scp to answer C-ECHO")
            storescu(port, case / "dicom")
            results = wait_for(
                lambda: (r := _results_for(peer, study_uid)) and len(r) == 2 and r, 180,
                "SEG and SR from the split deployment",
            )
            d, rel_err = _check_results(case, results)
            print(f"split: dice={d:.3f} volume error={rel_err:.1%}")
            assert d >= 0.7 and rel_err <= 0.25
            jobs = {line[5]: line for line in _job_lines(config)}
            assert jobs[study_uid][1] == "delivered"
            # prefork worker: the child's counters reach the parent's /metrics
            text = _metrics(worker_metrics)
            assert _metric(text, "strokeseg_jobs_finished_total", state="delivered") >= 1
            assert scp.stop() == 0, scp.output()
            assert worker.stop() == 0, worker.output()


def test_serve_delivers_to_orthanc_with_storage_commitment(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    """A real PACS: results stored in Orthanc (REST) and committed in our database."""
    case = _largest_lesion_case(phantom_cases)
    study_uid = json.loads((case / "truth" / "truth.json").read_text())["study_instance_uid"]
    port = free_port()
    with Orthanc(tmp_path / "orthanc", modalities=[Modality("strokeseg", "STROKESEG", port)]) as pacs:
        destination = {
            **pacs.destination(), "name": "orthanc", "storage_commitment": True,
            "send": ["SEG", "SR", "OVERLAY"],
        }
        config = write_config(
            tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
            destinations=[destination], completion_timeout_s=1.0,
        )
        with Strokeseg("serve", config):
            wait_for(lambda: echo_ok(port), 60, "serve to start")
            storescu(port, case / "dicom")
            job = wait_for(
                lambda: [line for line in _job_lines(config) if line[5] == study_uid and line[1] in ("delivered", "failed")],
                180, "the job to finish",
            )[0]
            assert job[1] == "delivered", job
            rows = wait_for(
                lambda: [
                    line.split("\t") for line in run_cli(config, "commitments").stdout.splitlines()[1:]
                    if line.split("\t")[3] == "committed"
                ],
                30, "the commitment report from Orthanc",
            )
            delivery = {line[0]: line[7] for line in _job_lines(config)}[job[0]]
        assert rows[0][1] == job[0] and rows[0][2] == "orthanc"
        assert int(rows[0][4]) == int(rows[0][5]) >= 3  # every object committed: SEG, SR, overlays
        n = int(rows[0][4])
        # what an operator sees: stored and confirmed by the PACS
        assert delivery == f"orthanc: stored {n}/{n}, committed {n}/{n}"
        in_pacs = pacs.sop_instance_uids()
        result_files = list((tmp_path / "spool" / "results" / job[0]).glob("*.dcm"))
        assert len(result_files) == n
        assert {p.name.split("_")[0] for p in result_files} == {"SEG", "SR", "OVERLAY"}
        for path in result_files:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert uid in in_pacs
            # the object as the PACS holds it passes dciodvfy
            held = tmp_path / "from-orthanc" / path.name
            held.parent.mkdir(exist_ok=True)
            held.write_bytes(pacs.instance_file(uid))
            assert dciodvfy_errors(held) == [], path.name


#: Orthanc deletes the first SEG it stores, right after storing it: the PACS "loses" an
#: object it acknowledged, so the commitment request that follows finds it missing.
LOSE_FIRST_SEG = """
lost = false
function OnStoredInstance(instanceId, tags, metadata, origin)
  if not lost and tags['Modality'] == 'SEG' then
    lost = true
    RestApiDelete('/instances/' .. instanceId)
  end
end
"""


def test_serve_resends_what_orthanc_lost_and_it_ends_committed_after_a_restart(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    """Orthanc reports the SEG missing (0x0112); after a restart the follow-up re-sends it
    (same SOP Instance UID), re-requests commitment and the job ends committed."""
    case = phantom_cases[0]
    study_uid = json.loads((case / "truth" / "truth.json").read_text())["study_instance_uid"]
    port = free_port()
    with Orthanc(tmp_path / "orthanc", modalities=[Modality("strokeseg", "STROKESEG", port)],
                 lua=LOSE_FIRST_SEG) as pacs:
        destination = {
            **pacs.destination(), "name": "orthanc", "storage_commitment": True,
            "send": ["SEG", "SR", "OVERLAY"],
        }

        def config(retry_initial_s: float) -> Path:
            return write_config(
                tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
                destinations=[destination], completion_timeout_s=1.0,
                delivery={"retry_initial_s": retry_initial_s, "commitment_max_attempts": 3},
            )

        # First run: no follow-up is due yet (retry_initial_s is an hour).
        first = config(3600)
        with Strokeseg("serve", first, log=tmp_path / "serve1.log") as serve:
            wait_for(lambda: echo_ok(port), 60, "serve to start")
            storescu(port, case / "dicom")
            job = wait_for(
                lambda: [line for line in _job_lines(first) if line[5] == study_uid and line[1] == "delivered"
                         and "orthanc: stored" in line[7] and "waiting for the report" not in line[7]],
                180, "the job delivered and Orthanc's commitment report",
            )[0]
            assert serve.stop() == 0, serve.output()
        # (Orthanc's Lua callback runs just after the SEG is stored, well before our N-ACTION.)
        assert "0x0112" in job[7], f"Orthanc did not report the SEG missing: {job[7]}"
        seg_file = next((tmp_path / "spool" / "results" / job[0]).glob("SEG_*.dcm"))
        seg_uid = str(pydicom.dcmread(seg_file, stop_before_pixels=True).SOPInstanceUID)
        assert not pacs.has_instance(seg_uid)
        assert "commitment pending" in job[7] and "0x0112 no such object instance; re-request due" in job[7]

        # Restart: the follow-up, read from the database, re-sends and re-requests.
        second = config(1)
        with Strokeseg("serve", second, log=tmp_path / "serve2.log"):
            wait_for(lambda: echo_ok(port), 60, "serve to restart")
            restarted = time.monotonic()
            line = wait_for(
                lambda: [x for x in _job_lines(second) if x[0] == job[0] and ", committed " in x[7]],
                60, "the re-sent SEG to be committed",
            )[0]
            recovery_s = time.monotonic() - restarted
        n = len(list((tmp_path / "spool" / "results" / job[0]).glob("*.dcm")))
        assert line[7] == f"orthanc: stored {n}/{n}, committed {n}/{n}"
        assert pacs.has_instance(seg_uid)  # the same SOP Instance UID is back in the PACS
        rows = [x.split("\t") for x in run_cli(second, "commitments").stdout.splitlines()[1:]]
        by_attempt = {int(r[8]): r for r in rows if r[1] == job[0]}
        assert sorted(by_attempt) == [1, 2]
        assert by_attempt[1][3] == "partially_failed"
        assert by_attempt[1][9].startswith("re-requested: ") and by_attempt[2][0] in by_attempt[1][9]
        assert (by_attempt[2][3], by_attempt[2][4], by_attempt[2][5]) == ("committed", "1", "1")
        print(f"\nserve restarted -> lost SEG re-sent, re-requested and committed in {recovery_s:.1f} s")


def test_pacs_down_then_up_is_retried_automatically_and_committed(
    tmp_path: Path, phantom_cases: list[Path]
) -> None:
    case = phantom_cases[0]
    port, pacs_port = free_port(), free_port()
    pacs = Orthanc(tmp_path / "orthanc", modalities=[Modality("strokeseg", "STROKESEG", port)],
                   dicom_port=pacs_port)
    config = write_config(
        tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
        destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                       "port": pacs_port, "storage_commitment": True}],
        completion_timeout_s=1.0,
        delivery={"retry_initial_s": 2, "retry_max_interval_s": 4},
    )
    with Strokeseg("serve", config):
        wait_for(lambda: echo_ok(port), 60, "serve to start")
        storescu(port, case / "dicom")
        failed = wait_for(
            lambda: [line for line in _job_lines(config) if line[1] == "retrying"], 120, "first delivery to fail (retry scheduled)"
        )[0]
        assert "automatic retry at" in failed[6]
        with pacs:
            wait_for(
                lambda: any(line[0] == failed[0] and line[1] == "delivered" for line in _job_lines(config)),
                60, "automatic retry to deliver",
            )
            wait_for(
                lambda: any(
                    line.split("\t")[3] == "committed"
                    for line in run_cli(config, "commitments").stdout.splitlines()[1:]
                ),
                30, "storage commitment after the retry",
            )
            made = {p.name.split("_", 1)[1][:-4] for p in (tmp_path / "spool" / "results" / failed[0]).glob("*.dcm")}
            assert made and made <= pacs.sop_instance_uids()
