"""Load drill: nine studies over nine concurrent associations to ``strokeseg serve``; each is
delivered exactly once (one SEG and one SR per study at the PACS, every job delivered)."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import dcmtk_tool, free_port
from tests.peers import StoreSCP, Strokeseg, echo_ok, run_cli, wait_for, write_config

pytestmark = [pytest.mark.network, pytest.mark.slow]

SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"
SR_UID = "1.2.840.10008.5.1.4.1.1.88.34"


def _copy_with_new_uids(case: Path, out: Path) -> str:
    """The case's study under new Study/Series/SOP Instance UIDs (a different patient visit)."""
    out.mkdir(parents=True)
    mapping: dict[str, str] = {}

    def new(uid: str) -> str:
        return mapping.setdefault(uid, generate_uid())

    study = ""
    for path in sorted((case / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study = new(str(ds.StudyInstanceUID))
        ds.SeriesInstanceUID = new(str(ds.SeriesInstanceUID))
        ds.SOPInstanceUID = new(str(ds.SOPInstanceUID))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / path.name)
    return study


def test_concurrent_associations_each_study_delivered_once(tmp_path: Path, phantom_cases: list[Path]) -> None:
    studies = {}
    for copy in range(3):
        for i, case in enumerate(phantom_cases):
            folder = tmp_path / "send" / f"{copy}-{i}"
            studies[_copy_with_new_uids(case, folder)] = folder
    port = free_port()
    with StoreSCP(tmp_path / "pacs") as peer:
        config = write_config(tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
                              destinations=[peer.destination()], completion_timeout_s=2.0)
        with Strokeseg("serve", config) as serve:
            wait_for(lambda: echo_ok(port), 60, "serve to start")
            senders = [
                subprocess.Popen([dcmtk_tool("storescu"), "-aet", f"MRI{n}", "-aec", "STROKESEG", "+sd", "+r",
                                  "127.0.0.1", str(port), str(folder)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for n, folder in enumerate(studies.values())
            ]
            for sender in senders:
                output, _ = sender.communicate(timeout=180)
                assert sender.returncode == 0, output
            wait_for(lambda: len(peer.received()) >= 2 * len(studies), 300, "every study's SEG and SR")
            received = peer.received()
            per_study = Counter((str(ds.StudyInstanceUID), str(ds.SOPClassUID)) for ds in received)
            assert set(per_study) == {(s, c) for s in studies for c in (SEG_UID, SR_UID)}
            assert set(per_study.values()) == {1}  # exactly once
            lines = run_cli(config, "jobs").stdout.strip().splitlines()[1:]
            states = Counter(line.split("\t")[1] for line in lines)
            assert states == {"delivered": len(studies)}, lines
            assert serve.stop() == 0, serve.output()
