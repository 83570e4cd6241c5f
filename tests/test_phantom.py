"""The phantom generator: DICOM encoding, geometry, signal model, truth, determinism.

Phantoms are what the model is trained and tested on, so a silent error here
(a flipped slice order, a mask off by one slice, an ADC in the wrong unit)
would make every downstream number meaningless.  These tests read the files
back with pydicom exactly as the service would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.synth import (
    LesionClass,
    PhantomStudy,
    case_seed,
    generate_phantom,
    write_phantom_cases,
    write_phantom_study,
)
from models.synth.lesions import CLASS_PROBABILITIES, choose_lesion_class

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def study() -> PhantomStudy:
    return generate_phantom(7, lesion_class="medium", with_tissue_maps=True)


@pytest.fixture(scope="module")
def case_dir(study: PhantomStudy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_study(study, tmp_path_factory.mktemp("phantom") / "case_0000")


@pytest.fixture(scope="module")
def datasets(case_dir: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted((case_dir / "dicom").glob("*.dcm"))]


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def _by_position(dss: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    n = _normal(dss[0])
    return sorted(dss, key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), n)))


def test_files_are_classic_mr_explicit_little_endian(datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        assert ds.preamble == b"\x00" * 128
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == MR_IMAGE_STORAGE
        assert ds.file_meta.MediaStorageSOPClassUID == MR_IMAGE_STORAGE
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SpecificCharacterSet == "ISO_IR 100"
        assert ds.Modality == "MR"
        assert (ds.BitsAllocated, ds.PixelRepresentation, ds.SamplesPerPixel) == (16, 0, 1)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.pixel_array.dtype == np.uint16
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1


def test_series_split_and_diffusion_tags(
    study: PhantomStudy, datasets: list[pydicom.Dataset]
) -> None:
    n_slices = study.geometry.shape[0]
    series: dict[str, list[pydicom.Dataset]] = {}
    for ds in datasets:
        series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    assert len(series) == 2
    dwi = next(v for v in series.values() if "ADC" not in v[0].ImageType)
    adc = next(v for v in series.values() if "ADC" in v[0].ImageType)
    assert len(dwi) == 2 * n_slices and len(adc) == n_slices
    assert dwi[0].SeriesNumber != adc[0].SeriesNumber
    for ds in dwi:
        b = float(ds.DiffusionBValue)
        assert b in (0.0, 1000.0)
        assert ds.DiffusionDirectionality == ("NONE" if b == 0 else "ISOTROPIC")
        assert list(ds.ImageType) == [
            "ORIGINAL", "PRIMARY", "DIFFUSION", "NONE" if b == 0 else "TRACEW"
        ]
        assert ds.ScanningSequence == "EP" and list(ds.SequenceVariant) == ["SK", "SP"]
        assert ds.MRAcquisitionType == "2D"
        assert ds.SeriesDescription == "ep2d_diff_trace"
    assert sum(float(ds.DiffusionBValue) == 0 for ds in dwi) == n_slices
    for ds in adc:
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        assert ds.SeriesDescription == "ep2d_diff_ADC"
    assert sorted(int(ds.InstanceNumber) for ds in dwi) == list(range(1, 2 * n_slices + 1))


def test_geometry_and_slice_order_match_truth(
    study: PhantomStudy, datasets: list[pydicom.Dataset]
) -> None:
    """mask[k] belongs to the k-th image sorted ascending along cross(row, col)."""
    geo = study.geometry
    n_slices, rows, cols = geo.shape
    for kind, expected in (("b0", study.b0), ("b1000", study.dwi), ("adc", study.adc)):
        if kind == "adc":
            images = [ds for ds in datasets if "ADC" in ds.ImageType]
        else:
            b = 0.0 if kind == "b0" else 1000.0
            images = [
                ds for ds in datasets
                if "ADC" not in ds.ImageType and float(ds.DiffusionBValue) == b
            ]
        ordered = _by_position(images)
        assert len(ordered) == n_slices
        n = _normal(ordered[0])
        np.testing.assert_allclose(n, geo.slice_cosine, atol=1e-6)
        positions = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in ordered])
        np.testing.assert_allclose(positions[0], geo.origin, atol=1e-4)
        steps = np.diff(positions, axis=0)
        np.testing.assert_allclose(steps @ n, geo.slice_spacing, atol=1e-3)
        np.testing.assert_allclose(np.linalg.norm(steps, axis=1), geo.slice_spacing, atol=1e-3)
        for k, ds in enumerate(ordered):
            assert (ds.Rows, ds.Columns) == (rows, cols)
            np.testing.assert_allclose(
                [float(v) for v in ds.PixelSpacing], geo.pixel_spacing, rtol=1e-9
            )
            assert float(ds.SliceThickness) == geo.slice_thickness
            assert float(ds.SpacingBetweenSlices) == geo.slice_spacing
            assert float(ds.SliceLocation) == pytest.approx(float(positions[k] @ n), abs=1e-3)
            np.testing.assert_array_equal(ds.pixel_array, expected[k])
    # Slice thickness leaves a gap: spacing must exceed thickness in this protocol.
    assert geo.slice_spacing > geo.slice_thickness
    assert 22 <= n_slices <= 30 and rows in (128, 160, 192, 256)


def test_truth_files_are_consistent(study: PhantomStudy, case_dir: Path) -> None:
    mask = np.load(case_dir / "truth" / "mask.npy")
    truth = json.loads((case_dir / "truth" / "truth.json").read_text())
    assert mask.dtype == np.bool_ and mask.shape == study.geometry.shape
    np.testing.assert_array_equal(mask, study.mask)
    voxel_ml = study.geometry.voxel_volume_ml
    assert truth["lesion_volume_ml"] == pytest.approx(mask.sum() * voxel_ml)
    assert truth["lesion_volume_continuous_ml"] == pytest.approx(
        study.fractions.sum(dtype=np.float64) * voxel_ml
    )
    assert truth["study_instance_uid"] == study.identity.study_instance_uid
    assert truth["seed"] == 7 and truth["lesion_class"] == "medium"
    assert truth["n_lesions"] == len(study.lesions) >= 1
    assert truth["shape"] == list(mask.shape)
    assert truth["pixel_spacing"] == list(study.geometry.pixel_spacing)
    assert truth["slice_spacing"] == study.geometry.slice_spacing
    assert truth["manufacturer"] == "SIEMENS"
    np.testing.assert_array_equal(study.mask, study.fractions >= 0.5)


def test_signal_model(study: PhantomStudy) -> None:
    assert study.tissue_fractions is not None
    gm, wm, csf = study.tissue_fractions
    adc = study.adc.astype(float)  # 1e-6 mm2/s
    dwi = study.dwi.astype(float)
    lesion = study.fractions > 0.9
    parenchyma = (gm + wm > 0.9) & (study.fractions == 0)
    pure_csf = csf > 0.9
    assert lesion.sum() > 20 and parenchyma.sum() > 1000 and pure_csf.sum() > 20
    assert 300 < np.median(adc[lesion]) < 620
    assert 600 < np.median(adc[parenchyma]) < 900
    assert np.median(adc[lesion]) < 0.8 * np.median(adc[parenchyma])
    assert np.median(adc[pure_csf]) > 2200
    assert np.median(dwi[lesion]) > 1.25 * np.median(dwi[parenchyma])
    # Background: no ADC, and only noise on the images.
    background = (gm + wm + csf == 0) & (study.b0 < 3 * study.noise_sigma)
    assert background.sum() > 1000
    assert np.mean(adc[background] == 0) > 0.99
    assert study.adc.max() <= 5000


def test_size_classes_are_reachable() -> None:
    ranges = {
        LesionClass.SMALL: (0.2, 1.7),
        LesionClass.MEDIUM: (1.7, 14.0),
        LesionClass.LARGE: (14.0, 120.0),
    }
    for seed, (cls, (lo, hi)) in enumerate(ranges.items(), start=100):
        s = generate_phantom(seed, lesion_class=cls)
        assert s.lesion_class is cls
        targets = sum(spec.target_volume_ml for spec in s.lesions)
        assert lo <= targets <= hi
        # The rasterised partial-volume lesion honours the target volume.
        assert s.lesion_volume_continuous_ml == pytest.approx(targets, rel=0.3, abs=0.15)
    none = generate_phantom(104, lesion_class="none")
    assert not none.mask.any() and not none.lesions and none.fractions.max() == 0
    # Default draws cover every class with the advertised frequencies.
    rng = np.random.default_rng(0)
    draws = [choose_lesion_class(rng) for _ in range(2000)]
    for cls, p in CLASS_PROBABILITIES.items():
        assert draws.count(cls) / len(draws) == pytest.approx(p, abs=0.04)


def test_deterministic_by_seed() -> None:
    a = generate_phantom(21)
    b = generate_phantom(21)
    c = generate_phantom(22)
    for name in ("b0", "dwi", "adc", "mask", "fractions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.identity == b.identity and a.geometry == b.geometry
    assert a.identity.study_instance_uid != c.identity.study_instance_uid
    assert a.geometry != c.geometry or not np.array_equal(a.b0, c.b0)


def test_write_cases_layout(tmp_path: Path) -> None:
    paths = write_phantom_cases(tmp_path, 2, seed=5)
    assert [p.name for p in paths] == ["case_0000", "case_0001"]
    seeds = []
    for i, path in enumerate(paths):
        truth = json.loads((path / "truth" / "truth.json").read_text())
        assert truth["seed"] == case_seed(5, i) >= 1000
        seeds.append(truth["seed"])
        ds = pydicom.dcmread(next((path / "dicom").glob("*.dcm")), stop_before_pixels=True)
        assert str(ds.PatientName) == f"PHANTOM^CASE{i:04d}"
        assert ds.StudyInstanceUID == truth["study_instance_uid"]
    assert len(set(seeds)) == 2


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_reports_no_errors(case_dir: Path) -> None:
    files = sorted((case_dir / "dicom").glob("*.dcm"))
    dwi = next(p for p in files if p.name.startswith("DWI"))
    adc = next(p for p in files if p.name.startswith("ADC"))
    for path in (dwi, adc):
        result = subprocess.run(
            ["dciodvfy", "-new", str(path)], capture_output=True, text=True, check=False
        )
        errors = [
            line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")
        ]
        assert not errors, f"{path.name}: {errors}"
