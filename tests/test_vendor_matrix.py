"""Issue 3's acceptance matrix: one phantom study per vendor convention, through
``strokeseg segment`` and through the network (storescu -> strokeseg serve -> storescp),
each scored against the phantom's ground truth; and refusals with nothing sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from models.synth import VendorConvention, generate_phantom, vendor_datasets, write_vendor_study
from service.derive import read_lesion_volume_ml
from tests.conftest import REPO, free_port
from tests.peers import StoreSCP, Strokeseg, echo_ok, run_cli, storescu, wait_for, write_config

pytestmark = pytest.mark.slow

SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"
SR_UID = "1.2.840.10008.5.1.4.1.1.88.34"
# One medium and one large phantom (seeds < 1000: never used in training).
SEEDS = (634, 523)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], Path]:
    root = tmp_path_factory.mktemp("vendor-matrix")
    cases: dict[tuple[int, str], Path] = {}
    for seed in SEEDS:
        phantom = generate_phantom(seed)
        for convention in VendorConvention:
            cases[(seed, convention.value)] = write_vendor_study(phantom, root / f"{seed}-{convention.value}", convention)
    return cases


def _truth(case: Path) -> dict:
    return json.loads((case / "truth" / "truth.json").read_text())


def _seg_mask(seg: pydicom.Dataset, truth_shape: tuple[int, ...], truth: dict) -> np.ndarray:
    """SEG frames placed on the truth grid by plane position (works for every source layout)."""
    origin = np.asarray(truth["origin"])
    normal = np.asarray(truth["slice_cosine"])
    spacing = float(truth["slice_spacing"])
    frames = seg.pixel_array.reshape(-1, *truth_shape[1:])
    mask = np.zeros(truth_shape, dtype=bool)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        k = int(round(float((position - origin) @ normal) / spacing))
        mask[k] |= frame.astype(bool)
    return mask


# Volume: within 15 % of the truth, or 0.5 mL on a small lesion (a one-voxel rim of a 2.5 mL
# lesion at 5 mm slices is about 0.4 mL: partial volume, not a convention error).
MAX_REL_VOLUME_ERROR = 0.15
MAX_ABS_VOLUME_ERROR_ML = 0.5
# Every convention of one phantom reads the same images: its volume matches the standard
# convention's within 2 % (a computed ADC, from the b0 and the trace, may differ slightly).
MAX_CONVENTION_SPREAD = 0.02


def _score(case: Path, seg: pydicom.Dataset, sr: pydicom.Dataset) -> tuple[float, float, float]:
    """Dice, the reported volume (mL) and the truth volume (mL)."""
    truth = _truth(case)
    truth_mask = np.load(case / "truth" / "mask.npy")
    mask = _seg_mask(seg, truth_mask.shape, truth)
    dice = 2 * float((mask & truth_mask).sum()) / max(int(mask.sum() + truth_mask.sum()), 1)
    return dice, read_lesion_volume_ml(sr), float(truth["lesion_volume_ml"])


def _results(folder: Path) -> dict[str, dict[str, pydicom.Dataset]]:
    by_study: dict[str, dict[str, pydicom.Dataset]] = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        kind = "SEG" if ds.SOPClassUID == SEG_UID else "SR" if ds.SOPClassUID == SR_UID else None
        if kind:
            by_study.setdefault(str(ds.StudyInstanceUID), {})[kind] = ds
    return by_study


def _assert_quality(matrix: dict[tuple[int, str], Path], results: dict[str, dict[str, pydicom.Dataset]], how: str) -> None:
    report = []
    for (seed, convention), case in sorted(matrix.items()):
        study_uid = _truth(case)["study_instance_uid"]
        assert study_uid in results, f"{how}: no result for {convention} (seed {seed})"
        dice, volume, truth_volume = _score(case, results[study_uid]["SEG"], results[study_uid]["SR"])
        report.append((seed, convention, dice, volume, truth_volume))
    print(f"\n{how}: seed convention dice volume_ml truth_ml volume_error")
    for seed, convention, dice, volume, truth_volume in report:
        print(f"  {seed} {convention:22s} {dice:.3f} {volume:8.2f} {truth_volume:8.2f} "
              f"{abs(volume - truth_volume) / truth_volume:6.1%}")
    standard = {seed: volume for seed, convention, _, volume, _ in report if convention == "standard"}
    for seed, convention, dice, volume, truth_volume in report:
        assert dice >= 0.7, f"{how} {convention} seed {seed}: Dice {dice:.3f}"
        error = abs(volume - truth_volume)
        assert error <= max(MAX_REL_VOLUME_ERROR * truth_volume, MAX_ABS_VOLUME_ERROR_ML), (
            f"{how} {convention} seed {seed}: volume {volume:.2f} mL, truth {truth_volume:.2f} mL")
        assert abs(volume - standard[seed]) <= MAX_CONVENTION_SPREAD * standard[seed], (
            f"{how} {convention} seed {seed}: {volume:.2f} mL, the standard convention {standard[seed]:.2f} mL")


def test_every_convention_through_strokeseg_segment(matrix: dict[tuple[int, str], Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "segment", str(next(iter(matrix.values())).parent), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("\tok\t") == len(matrix)
    _assert_quality(matrix, _results(out), "segment")


def _refusal_studies(folder: Path) -> dict[str, str]:
    """Broken variants of one phantom, each its own study; returns study UID -> expected reason."""
    phantom = generate_phantom(SEEDS[0])
    standard = vendor_datasets(phantom, VendorConvention.STANDARD)

    def kind(ds: pydicom.Dataset) -> str:
        types = [str(v).upper() for v in ds.ImageType]
        return "adc" if "ADC" in types else "b0" if float(ds.get("DiffusionBValue", 0) or 0) < 1 else "b1000"

    variants = {
        "no high-b": ([ds for ds in standard if kind(ds) != "b1000"], "no high-b"),
        "no ADC, no b0": ([ds for ds in standard if kind(ds) == "b1000"], "b0"),
        "ADC in another frame of reference": (standard, "frames of reference"),
    }
    expected: dict[str, str] = {}
    for i, (name, (datasets, reason)) in enumerate(variants.items()):
        study_uid = generate_uid()
        other_frame = generate_uid()
        series = {"adc": generate_uid(), "dwi": generate_uid()}
        target = folder / f"refuse-{i}"
        target.mkdir(parents=True)
        for j, ds in enumerate(datasets):
            ds = ds.copy()
            ds.StudyInstanceUID = study_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = series["adc" if kind(ds) == "adc" else "dwi"]
            if name.startswith("ADC in another") and kind(ds) == "adc":
                ds.FrameOfReferenceUID = other_frame
            ds.save_as(target / f"{j:04d}.dcm", enforce_file_format=True)
        expected[study_uid] = reason
    return expected


@pytest.mark.network
def test_every_convention_over_the_network_and_refusals_send_nothing(
    matrix: dict[tuple[int, str], Path], tmp_path: Path
) -> None:
    network_cases = {key: case for key, case in matrix.items() if key[0] == SEEDS[0]}
    refusals = _refusal_studies(tmp_path / "refusals")
    with StoreSCP(tmp_path / "pacs") as peer:
        port = free_port()
        config = write_config(
            tmp_path / "serve.yaml", scp_port=port, spool=tmp_path / "spool",
            destinations=[peer.destination()], completion_timeout_s=3.0,
        )
        with Strokeseg("serve", config) as serve:
            wait_for(lambda: echo_ok(port), 60, "serve to start")
            for case in network_cases.values():
                storescu(port, case / "dicom")
            storescu(port, tmp_path / "refusals")
            expected_jobs = len(network_cases) + len(refusals)

            def finished() -> list[list[str]]:
                lines = [line.split("\t") for line in run_cli(config, "jobs").stdout.strip().splitlines()[1:]]
                done = [line for line in lines if line[1] in ("delivered", "failed", "refused")]
                return lines if len(done) >= expected_jobs else []

            jobs = wait_for(finished, 600, "every study to finish")
            assert serve.proc is not None and serve.proc.poll() is None
        by_study = {line[5]: line for line in jobs}
        for study_uid, reason in refusals.items():
            assert by_study[study_uid][1] == "refused", by_study[study_uid]
            assert reason in by_study[study_uid][6]
        results = _results(peer.folder)
        for study_uid in refusals:
            assert study_uid not in results, "nothing may be sent for a refused study"
        _assert_quality(network_cases, results, "network")
