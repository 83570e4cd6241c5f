"""Fuzz drill: 1,000 seeded, mutated C-STORE datasets over the network.

No process dies, every request gets a proper DIMSE status (no abort, no hang), nothing that
was not answered Success is on disk or in the database, and a valid study sent afterwards is
stored in full. The mutations are applied to the encoded dataset bytes, as a broken sender or
a damaged network path would deliver them (pynetdicom's encoder is bypassed, as in
``test_scp.test_unparseable_dataset_gets_failure_and_scp_keeps_serving``).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from service.db import Database, JobStore
from service.scp import StorageSCP
from service.storage import Spool
from tests.conftest import free_port
from tests.dicom_factory import make_dwi_series
from tests.peers import echo_ok, storescu

pytestmark = pytest.mark.network

MUTANTS = 1000
PROPER = {0x0000, 0xA700, 0xA900, 0xC000, 0x0107, 0xB000, 0xB007, 0xB006}


def _encoded(ds: object) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)  # type: ignore[arg-type]
    return bytes(buffer.getvalue())


def _mutate(data: bytes, rng: random.Random) -> bytes:
    body = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 12)):
            body[rng.randrange(len(body))] = rng.randrange(256)
    elif kind == 1:  # cut short
        del body[rng.randrange(len(body)):]
    elif kind == 2:  # junk inserted
        at = rng.randrange(len(body))
        body[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3:  # a length field made huge or odd
        at = rng.randrange(0, max(1, len(body) - 4))
        body[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\xff\xff\x00\x00", b"\x01\x00\x00\x00"])
    else:  # a chunk of the dataset repeated
        a = rng.randrange(len(body))
        b = min(len(body), a + rng.randint(1, 256))
        body[a:a] = body[a:b]
    return bytes(body)


def test_mutated_datasets_get_proper_statuses_and_the_scp_keeps_serving(
    tmp_path: Path, phantom_cases: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    store, spool = JobStore(db), Spool(tmp_path / "spool")
    scp = StorageSCP(ae_title="STROKESEG", host="127.0.0.1", port=free_port(), spool=spool, store=store)
    scp.start()
    try:
        template = make_dwi_series(2, 16, 16)[0]
        encoded = _encoded(template)
        rng = random.Random(20261202)
        mutants = [_mutate(encoded, rng) for _ in range(MUTANTS)]
        current: dict[str, bytes] = {}
        monkeypatch.setattr("pynetdicom.association.encode", lambda *a, **k: current["bytes"])
        ae = AE(ae_title="FUZZ")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        ae.dimse_timeout = 30
        statuses: Counter[int] = Counter()
        aborted = 0
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="STROKESEG")
        for mutant in mutants:
            if not assoc.is_established:
                aborted += 1
                assoc = ae.associate("127.0.0.1", scp.port, ae_title="STROKESEG")
                assert assoc.is_established
            current["bytes"] = mutant
            answer = assoc.send_c_store(template)
            status = int(answer.Status) if "Status" in answer else None
            assert status is not None, "no DIMSE response to a mutated dataset"
            statuses[status] += 1
        assoc.release()
        monkeypatch.undo()
        print(f"fuzz: {dict(statuses)}, re-associations {aborted}")
        assert set(statuses) <= PROPER, statuses
        assert aborted == 0
        assert statuses[0xC000] > 0  # the run did reach the parser's refusals
        # Only what was answered Success may be kept, and it is recorded.
        on_disk = sorted(spool.incoming.rglob("*.dcm")) if spool.incoming.exists() else []
        recorded = store.recorded_paths()
        assert {str(p) for p in on_disk} <= recorded
        assert len(on_disk) <= statuses[0x0000]

        assert echo_ok(scp.port)
        case = phantom_cases[0]
        storescu(scp.port, case / "dicom")
        sent = sorted((case / "dicom").rglob("*.dcm"))
        study_files = [p for p in spool.incoming.rglob("*.dcm") if str(p) in store.recorded_paths()]
        assert len(study_files) >= len(sent)
    finally:
        scp.stop()
        db.dispose()
