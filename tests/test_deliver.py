"""Delivery against a scripted peer that refuses every object with a DIMSE status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    SegmentationStorage,
)

from service.config import load_settings
from service.deliver import store_objects
from service.derive import (
    AlgorithmInfo,
    DerivationSources,
    DeriveOptions,
    LesionMask,
    write_results,
)
from service.pipeline import WorkerContext, _deliver
from tests.conftest import free_port
from tests.dicom_factory import make_dwi_series, write_series
from tests.peers import dciodvfy_errors

pytestmark = pytest.mark.network

OUT_OF_RESOURCES = 0xA700


@pytest.fixture
def refusing_peer() -> Iterator[int]:
    """A real SCP on loopback that answers every C-STORE with 0xA700."""
    ae = AE(ae_title="REFUSER")
    for sop_class in (SegmentationStorage, Comprehensive3DSRStorage, ComprehensiveSRStorage):
        ae.add_supported_context(sop_class)
    port = free_port()

    def refuse(event: Any) -> int:
        return OUT_OF_RESOURCES

    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)])
    try:
        yield port
    finally:
        server.shutdown()


def test_refused_objects_are_recorded_with_their_status_code(tmp_path: Path, refusing_peer: int) -> None:
    series = make_dwi_series(6, 32, 32)
    paths = write_series(series, tmp_path / "src")
    mask = np.zeros((6, 32, 32), dtype=bool)
    mask[2:4, 10:20, 10:20] = True
    objects = write_results(
        DerivationSources.from_paths(paths),
        LesionMask(mask, float(mask.sum()) * 3.5 * 3.5 * 5.5 / 1000),
        None,
        AlgorithmInfo("m", "1"),
        tmp_path / "out",
    )

    destination = {"name": "refuser", "ae_title": "REFUSER", "host": "127.0.0.1", "port": refusing_peer}
    settings = load_settings(spool_dir=tmp_path / "spool", destinations=[destination])
    outcomes = store_objects(settings.destinations[0], objects, calling_ae_title="STROKESEG")
    assert [o.status_code for o in outcomes] == [OUT_OF_RESOURCES] * len(objects)
    assert not any(o.stored for o in outcomes)

    ctx = WorkerContext.from_settings(settings)
    job_id = ctx.store.record_instance(
        study_instance_uid=str(series[0].StudyInstanceUID), series_instance_uid=str(series[0].SeriesInstanceUID),
        sop_instance_uid=str(series[0].SOPInstanceUID), sop_class_uid=str(series[0].SOPClassUID),
        path=str(paths[0]), size_bytes=1, calling_ae_title="MRI1",
    )
    problems = _deliver(ctx, job_id, objects)
    assert problems and all("0xA700" in p for p in problems)
    rows = ctx.store.deliveries(job_id)
    assert {(r.kind, r.status, r.status_code) for r in rows} == {
        ("SEG", "failed", OUT_OF_RESOURCES), ("SR", "failed", OUT_OF_RESOURCES),
    }
    ctx.db.dispose()


def test_a_new_result_version_references_its_predecessor_report(tmp_path: Path) -> None:
    series = make_dwi_series(6, 32, 32)
    paths = write_series(series, tmp_path / "src")
    mask = np.zeros((6, 32, 32), dtype=bool)
    mask[2:4, 10:20, 10:20] = True
    volume = float(mask.sum()) * 3.5 * 3.5 * 5.5 / 1000
    sources, segmentation = DerivationSources.from_paths(paths), LesionMask(mask, volume)
    first = write_results(sources, segmentation, None, AlgorithmInfo("m", "1"), tmp_path / "v1")
    first_sr = next(o for o in first if o.kind == "SR")
    second = write_results(
        sources,
        segmentation,
        None,
        AlgorithmInfo("m", "2"),
        tmp_path / "v2",
        DeriveOptions(previous_reports=[first_sr.path]),
    )
    sr = pydicom.dcmread(next(o for o in second if o.kind == "SR").path)
    referenced = [
        inst.ReferencedSOPInstanceUID
        for study in sr.PredecessorDocumentsSequence
        for series_item in study.ReferencedSeriesSequence
        for inst in series_item.ReferencedSOPSequence
    ]
    assert referenced == [first_sr.sop_instance_uid]
    assert dciodvfy_errors(next(o for o in second if o.kind == "SR").path) == []
