"""Incomplete studies over the network (storescu -> strokeseg serve): refused, never delivered.

Fault drills from outside testers (issue 10, item 8): an ADC covering 17 of
28 DWI slices, a DWI transfer cut after 4 of 28 slices, and an ADC whose
header is shifted by 30 mm.  Each was once delivered as a normal result
(17.37 mL, 0.00 mL, 209.95 mL).  A complete copy of the same synthetic
study is the control: it must be delivered, so a refusal here is about the
missing part and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import free_port
from tests.dicom_factory import make_dwi_series, write_series
from tests.peers import StoreSCP, Strokeseg, echo_ok, run_cli, storescu, wait_for, write_config

pytestmark = [pytest.mark.network, pytest.mark.slow]

SLICES = 28


def _study(folder: Path, *, adc_slices: slice = slice(None), dwi_slices: slice = slice(None),
           adc_shift_mm: float = 0.0) -> str:
    """b0 + b1000 in one series and a scanner ADC series; parts left out or moved as asked."""
    study, frame = generate_uid(), generate_uid()
    b0 = make_dwi_series(SLICES, 64, 64, b_value=0.0, study_instance_uid=study, frame_of_reference_uid=frame)
    dwi = make_dwi_series(SLICES, 64, 64, b_value=1000.0, study_instance_uid=study,
                          frame_of_reference_uid=frame, seed=1)
    adc = make_dwi_series(SLICES, 64, 64, study_instance_uid=study, frame_of_reference_uid=frame, seed=2)
    for ds in b0:
        ds.SeriesInstanceUID = dwi[0].SeriesInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
    for ds in dwi:
        ds.PixelData = (ds.pixel_array * 0.45).astype(np.uint16).tobytes()
    for ds in adc:
        del ds.DiffusionBValue
        ds.SeriesNumber = 6
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        ds.PixelData = np.where(ds.pixel_array > 200, 800, 0).astype(np.uint16).tobytes()
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + adc_shift_mm, y, z]
    sent: list[Dataset] = b0 + dwi[dwi_slices] + adc[adc_slices]
    write_series(sent, folder)
    return study


def _jobs(config: Path) -> dict[str, list[str]]:
    result = run_cli(config, "jobs")
    assert result.returncode == 0, result.stderr
    return {line.split("\t")[5]: line.split("\t") for line in result.stdout.strip().splitlines()[1:]}


def test_incomplete_studies_are_refused_over_the_network(tmp_path: Path) -> None:
    drills = {
        "control": ({}, None),
        "adc 17 of 28": ({"adc_slices": slice(0, 17)}, "ADC map covers 17 of 28 DWI slices"),
        "dwi cut 4 of 28": ({"dwi_slices": slice(0, 4)}, "DWI incomplete: 4 of 28 slices"),
        "adc shifted 30 mm": ({"adc_shift_mm": 30.0}, "does not line up with the DWI"),
    }
    uids = {name: _study(tmp_path / name.replace(" ", "_"), **kwargs) for name, (kwargs, _) in drills.items()}
    with StoreSCP(tmp_path / "pacs") as peer:
        port = free_port()
        config = write_config(tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
                              destinations=[peer.destination()], completion_timeout_s=1.0)
        with Strokeseg("serve", config) as serve:
            wait_for(lambda: echo_ok(port), 60, "strokeseg serve to answer C-ECHO")
            for name in drills:
                storescu(port, tmp_path / name.replace(" ", "_"))
            jobs = wait_for(
                lambda: (j := _jobs(config)) and all(
                    uid in j and j[uid][1] in ("delivered", "refused", "failed") for uid in uids.values()
                ) and j,
                240, "every drill to end",
            )
            log = serve.output()
        for name, (_, reason) in drills.items():
            state, why = jobs[uids[name]][1], jobs[uids[name]][6]
            if reason is None:
                assert state == "delivered", (name, why, log[-3000:])
            else:
                assert state == "refused", (name, state, why)
                assert reason in why, (name, why)
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                    for p in peer.folder.iterdir() if p.is_file()}
        assert received == {uids["control"]}, "nothing may be sent for a refused study"
