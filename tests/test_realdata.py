"""Real scanner files of healthy volunteers: no lesion reported, and lesions inserted with truth.

The scans in tests/data/realdata (BSD-2, see its README and LICENSE files) are
real Siemens MOSAIC and Canon Enhanced MR acquisitions of healthy subjects:
every millilitre the served model reports on them is a false positive.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from models.synth.insert import SourceStudy
from models.synth.lesions import LesionClass
from service.config import load_settings
from service.derive.sr import read_lesion_findings
from service.inference import load_model
from service.intake import ImageRole, load_study
from service.intake.planes import resolve_series_conventions
from service.intake.reading import read_planes as _read_planes
from service.pipeline import segment_files
from service.preprocess import brain_mask
from tests.peers import dciodvfy_errors

REALDATA = Path(__file__).parent / "data" / "realdata"
SCANS = sorted(p for p in REALDATA.iterdir() if (p / "dicom").is_dir())
BUNDLED = Path(__file__).parents[1] / "models" / "zoo"


def _files(scan: Path) -> list[Path]:
    return sorted(p for p in (scan / "dicom").rglob("*") if p.is_file())


def _acquired_b(scan: Path) -> float:
    (bval,) = (scan / "ref").glob("*.bval")
    return max(float(v) for v in bval.read_text().split())


def test_the_license_notices_travel_with_the_copies() -> None:
    assert {p.name for p in SCANS} == {"decubitus_hfs", "canon61_enh_3000"}
    assert (REALDATA / "LICENSE.dcm_qa_decubitus").is_file()
    assert (REALDATA / "LICENSE.dcm_qa_canon_61").is_file()


@pytest.mark.parametrize("scan", SCANS, ids=[p.name for p in SCANS])
def test_every_b_value_of_the_reference_is_read(scan: Path) -> None:
    """Issue 10: each real scan is read with exactly the b-values of its dcm2niix ``.bval``."""
    planes = resolve_series_conventions(_read_planes(_files(scan)))
    diffusion = [p for p in planes if p.role in (ImageRole.B0, ImageRole.DWI, ImageRole.DIRECTIONAL)]
    positions = {tuple(np.round(p.geometry.position, 1)) for p in diffusion if p.geometry is not None}
    read = Counter(p.b_value for p in diffusion)
    volumes = {b: n / len(positions) for b, n in read.items()}
    (bval,) = (scan / "ref").glob("*.bval")
    assert volumes == dict(Counter(float(v) for v in bval.read_text().split()))


@pytest.mark.parametrize("scan", SCANS, ids=[p.name for p in SCANS])
def test_healthy_real_scan_gets_no_lesion_and_no_core(scan: Path, tmp_path: Path) -> None:
    """Issue 9's bar: <= 1 mL lesion and <= 1 mL ADC core on a real healthy brain."""
    settings = load_settings()
    model = load_model(settings.model_dir, intra_op_threads=2)
    result = segment_files(
        _files(scan), model, tmp_path, settings.preprocess.profile_options(), settings.derive,
        assess_settings=settings.assess,
    )
    assert result.study.b_value == pytest.approx(_acquired_b(scan), rel=0.02)
    assert result.findings is not None and result.validity is not None
    assert result.segmentation.lesion_volume_ml <= 1.0
    assert result.findings.adc_core_volume_ml <= 1.0
    assert result.validity.within, result.validity.reasons
    # the SR states it first, as read back from the written object
    reported = read_lesion_findings(pydicom.dcmread(next(tmp_path.glob("SR_*.dcm"))))
    assert reported.validity_status == "within"
    assert reported.lesion_volume_ml == pytest.approx(result.segmentation.lesion_volume_ml)
    for obj in result.objects:  # issue 10: what we write from real scanner files is valid
        assert dciodvfy_errors(obj.path) == [], obj.kind


@pytest.fixture(scope="module")
def hfs_source() -> SourceStudy:
    return SourceStudy(_files(REALDATA / "decubitus_hfs"), subject="test")


def test_insertion_changes_only_the_lesion_and_keeps_the_scan_noise(
    hfs_source: SourceStudy, tmp_path: Path
) -> None:
    rng = np.random.default_rng(20)
    record = hfs_source.write_case(tmp_path / "case", rng, lesion_class=LesionClass.MEDIUM, territory="MCA")
    truth = np.load(tmp_path / "case" / "truth" / "mask.npy")
    voxel_ml = hfs_source.study.dwi.voxel_volume_ml
    assert record["truth_volume_ml"] == pytest.approx(truth.sum() * voxel_ml)
    assert 1.0 <= record["truth_volume_ml"] <= 40.0
    assert record["lesions"] and 0.25e-3 <= record["lesions"][0]["adc_mm2_s"] <= 0.6e-3
    # The truth lies in the subject's own tissue: inside the brain mask the service counts
    # lesions in, and not in CSF (an affine MNI registration alone put 27 % of one subject's
    # truth voxels on skull, scalp and sulci, where no pixel changed).
    assert not (truth & ~brain_mask(hfs_source.study.dwi)).any()
    assert np.median(hfs_source.study.adc.voxels[truth]) < 1200.0
    assert record["kept_in_subject_tissue"] >= 0.5

    written = sorted((tmp_path / "case" / "dicom").glob("*.dcm"))
    edited = load_study(written)  # the real intake reads the edited MOSAICs
    source = hfs_source.study
    assert edited.dwi.shape == source.dwi.shape == truth.shape
    assert edited.study_instance_uid != source.study_instance_uid
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in _files(REALDATA / "decubitus_hfs")}
    news = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in written}
    assert not originals & news

    # Restricted diffusion inside: trace up, ADC down to an acute-infarct value.
    assert edited.dwi.voxels[truth].mean() > 1.3 * source.dwi.voxels[truth].mean()
    assert np.median(edited.adc.voxels[truth]) < 650.0
    assert np.median(source.adc.voxels[truth]) > 700.0
    # Far from the lesion not one pixel changed.
    near = ndimage.binary_dilation(truth, iterations=4)
    np.testing.assert_array_equal(edited.dwi.voxels[~near], source.dwi.voxels[~near])
    # The scan's own noise is kept: the change is a smooth signal added to the pixels
    # (S + S_smooth (f - 1)), so the pixel-to-pixel texture inside the lesion stays that of
    # the scan.  Multiplying the noisy pixels by f (x2-3 here) would scale it by f; replacing
    # the image by a model signal would smooth it away (the smoothed image scores ~0.84).
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    core = ndimage.binary_erosion(truth, structure=in_plane, iterations=2)
    assert core.sum() >= 15  # enough pixels to measure the texture on

    def texture(image: np.ndarray) -> float:
        return float((image - ndimage.gaussian_filter(image, (0, 1, 1)))[core].std())

    ratio = texture(edited.dwi.voxels) / texture(source.dwi.voxels)
    assert 0.9 < ratio < 1.6, ratio
    assert texture(ndimage.gaussian_filter(edited.dwi.voxels, (0, 1, 1))) / texture(source.dwi.voxels) < 0.9


def test_served_model_finds_an_inserted_lesion_on_real_anatomy(
    hfs_source: SourceStudy, tmp_path: Path
) -> None:
    rng = np.random.default_rng(31)
    hfs_source.write_case(tmp_path / "case", rng, lesion_class=LesionClass.MEDIUM, territory="MCA")
    truth = np.load(tmp_path / "case" / "truth" / "mask.npy")
    settings = load_settings()
    model = load_model(settings.model_dir, intra_op_threads=2)
    result = segment_files(
        sorted((tmp_path / "case" / "dicom").glob("*.dcm")), model, tmp_path / "out",
        settings.preprocess.profile_options(), settings.derive, assess_settings=settings.assess,
    )
    mask = result.segmentation.mask
    dice = 2.0 * float((mask & truth).sum()) / float(mask.sum() + truth.sum())
    truth_ml = float(truth.sum()) * result.study.dwi.voxel_volume_ml
    # One case, a smoke check of the whole path on real anatomy; the statistics over 174
    # held-out cases are in models/README.md (this 5.5 mL MCA lesion: Dice >= 0.7, read as 3.1 mL).
    assert dice >= 0.6, (dice, truth_ml, result.segmentation.lesion_volume_ml)
    assert abs(result.segmentation.lesion_volume_ml - truth_ml) <= max(1.0, 0.5 * truth_ml)


@pytest.mark.parametrize("scan", SCANS, ids=[p.name for p in SCANS])
def test_a_small_brainstem_infarct_on_real_anatomy_is_not_inflated(scan: Path, tmp_path: Path) -> None:
    """Issue 9: a real sub-mL brainstem infarct was once reported as 128 mL (the cortical ribbon).

    Four small brainstem lesions (seeds 40-43, 0.15-1.1 mL of truth in the subject's tissue) are
    inserted into each real scan.  None may be inflated: the reported volume and the ADC core
    stay within 1 mL of the truth, and nothing is reported away from the lesion.  Every lesion
    of at least 0.3 mL must be found.  The smaller ones (0.16-0.20 mL: seeds 40 and 42 on the
    Siemens scan, 40 on the Canon scan, 6-13 voxels) 0.7.0 misses, and that is measured, not
    hidden (models/README.md); 0.6.1 also missed seed 41 on the Siemens scan (0.92 mL, peak
    probability 0.59, under the card's 0.8 component rule).
    """
    source = SourceStudy(_files(scan), subject="test")
    settings = load_settings()
    model = load_model(settings.model_dir, intra_op_threads=2)
    for seed in (40, 41, 42, 43):
        case = tmp_path / f"case{seed}"
        record = source.write_case(
            case, np.random.default_rng(seed), lesion_class=LesionClass.SMALL, territory="brainstem"
        )
        truth = np.load(case / "truth" / "mask.npy")
        result = segment_files(
            sorted(p for p in (case / "dicom").rglob("*") if p.is_file()), model, case / "out",
            settings.preprocess.profile_options(), settings.derive, assess_settings=settings.assess,
        )
        reported = result.segmentation.lesion_volume_ml
        assert 0.0 < record["truth_volume_ml"] <= 1.7
        assert reported <= record["truth_volume_ml"] + 1.0, (seed, record["truth_volume_ml"], reported)
        assert result.findings is not None and result.findings.adc_core_volume_ml <= record["truth_volume_ml"] + 1.0
        mask = result.segmentation.mask
        if record["truth_volume_ml"] >= 0.3:
            assert (mask & truth).sum() > 0, (seed, record["truth_volume_ml"], reported)
        # nothing reported away from the inserted lesion
        assert (mask & ~ndimage.binary_dilation(truth, iterations=3)).sum() * source.study.dwi.voxel_volume_ml <= 0.5
