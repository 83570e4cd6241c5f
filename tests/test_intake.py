"""Intake: classify images, stack slices, pick DWI + ADC, and refuse with specific reasons."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.errors import (
    GeometryError,
    MissingADC,
    NoDiffusionSeries,
    NoHighBValue,
    UnreadableImage,
)
from service.intake import ImageRole, classify_image, load_study, stack_slices
from service.intake.study import _adc_to_micro
from tests.dicom_factory import make_dwi_series, write_series

N = 12


def _series(b: float | None, *, study: str, frame: str, adc: bool = False, n: int = N,
            rows: int = 32, spacing: tuple[float, float] = (3.5, 3.5)) -> list[Dataset]:
    series = make_dwi_series(n, rows, rows, b_value=b or 0.0, study_instance_uid=study,
                             frame_of_reference_uid=frame, pixel_spacing=spacing)
    for ds in series:
        if adc:
            del ds.DiffusionBValue
            ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
            arr = np.full((rows, rows), 800, dtype=np.uint16)
            ds.PixelData = arr.tobytes()
        elif b is None:  # a non-diffusion image (T1, FLAIR...): no diffusion naming either
            del ds.DiffusionBValue
            ds.SequenceName = "*tse2d1_15"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        elif b == 0:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
    return series


def _write(tmp_path: Path, *groups: list[Dataset]) -> list[Path]:
    paths: list[Path] = []
    for i, group in enumerate(groups):
        paths += write_series(group, tmp_path / f"s{i}")
    return paths


@pytest.fixture
def uids() -> tuple[str, str]:
    return generate_uid(), generate_uid()


def test_classification() -> None:
    study, frame = generate_uid(), generate_uid()
    assert classify_image(_series(1000, study=study, frame=frame)[0]).role is ImageRole.DWI
    assert classify_image(_series(0, study=study, frame=frame)[0]).role is ImageRole.B0
    assert classify_image(_series(None, study=study, frame=frame, adc=True)[0]).role is ImageRole.ADC
    assert classify_image(_series(None, study=study, frame=frame)[0]).role is ImageRole.OTHER
    directional = _series(1000, study=study, frame=frame)[0]
    directional.DiffusionDirectionality = "DIRECTIONAL"
    assert classify_image(directional).role is ImageRole.DIRECTIONAL
    eadc = _series(None, study=study, frame=frame, adc=True)[0]
    eadc.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "EADC"]
    assert classify_image(eadc).role is ImageRole.OTHER


def test_highest_b_and_scanner_adc(tmp_path: Path, uids: tuple[str, str]) -> None:
    study, frame = uids
    b0 = _series(0, study=study, frame=frame)
    b500 = _series(500, study=study, frame=frame)
    b1000 = _series(1000, study=study, frame=frame)
    adc = _series(None, study=study, frame=frame, adc=True)
    shuffled = list(reversed(b1000))  # arrival order must not matter
    result = load_study(_write(tmp_path, b0, b500, shuffled, adc))
    assert result.b_value == 1000
    assert result.dwi.shape == (N, 32, 32)
    assert [s.sop_instance_uid for s in result.dwi_sources] == [ds.SOPInstanceUID for ds in b1000]
    assert np.allclose(result.adc.voxels, 800.0)
    assert result.dwi.slice_spacing == pytest.approx(5.5)


def test_adc_computed_from_b0_when_absent(tmp_path: Path, uids: tuple[str, str]) -> None:
    study, frame = uids
    b0 = _series(0, study=study, frame=frame)
    b1000 = _series(1000, study=study, frame=frame)
    for s0, sb in zip(b0, b1000, strict=True):
        s0.PixelData = np.full((32, 32), 1000, dtype=np.uint16).tobytes()
        sb.PixelData = np.full((32, 32), round(1000 * np.exp(-0.8)), dtype=np.uint16).tobytes()
    result = load_study(_write(tmp_path, b0, b1000))
    assert np.median(result.adc.voxels) == pytest.approx(800.0, rel=0.01)
    assert any("computed" in note for note in result.notes)


def test_adc_on_another_grid_is_resampled(tmp_path: Path, uids: tuple[str, str]) -> None:
    study, frame = uids
    b1000 = _series(1000, study=study, frame=frame, rows=32, spacing=(3.5, 3.5))
    adc = _series(None, study=study, frame=frame, adc=True, rows=16, spacing=(7.0, 7.0))
    result = load_study(_write(tmp_path, b1000, adc))
    assert result.adc.shape == result.dwi.shape
    inside = result.adc.voxels[:, 4:28, 4:28]
    assert np.allclose(inside, 800.0, atol=1.0)


@pytest.mark.parametrize(
    ("unit_scale", "unit"), [(1.0, "1e-6"), (1e-3, "1e-3"), (1e-6, "mm2/s")]
)
def test_adc_units_are_inferred(unit_scale: float, unit: str) -> None:
    values = np.array([0, 700, 800, 3000], dtype=np.float32) * unit_scale
    micro, found = _adc_to_micro(values)
    assert unit in found
    assert np.allclose(micro, [0, 700, 800, 3000], rtol=1e-4)


def test_refuses_study_without_diffusion(tmp_path: Path, uids: tuple[str, str]) -> None:
    with pytest.raises(NoDiffusionSeries, match="no diffusion series"):
        load_study(_write(tmp_path, _series(None, study=uids[0], frame=uids[1])))


def test_refuses_without_high_b(tmp_path: Path, uids: tuple[str, str]) -> None:
    study, frame = uids
    with pytest.raises(NoHighBValue, match="500"):
        load_study(_write(tmp_path, _series(0, study=study, frame=frame), _series(200, study=study, frame=frame)))


def test_refuses_directional_only(tmp_path: Path, uids: tuple[str, str]) -> None:
    study, frame = uids
    series = _series(1000, study=study, frame=frame)
    for ds in series:
        ds.DiffusionDirectionality = "DIRECTIONAL"
    with pytest.raises(NoHighBValue, match="directional"):
        load_study(_write(tmp_path, series))


def test_refuses_without_adc_or_b0(tmp_path: Path, uids: tuple[str, str]) -> None:
    with pytest.raises(MissingADC, match="b0"):
        load_study(_write(tmp_path, _series(1000, study=uids[0], frame=uids[1])))


def test_refuses_adc_in_another_frame_of_reference(tmp_path: Path, uids: tuple[str, str]) -> None:
    study, frame = uids
    with pytest.raises(GeometryError, match="frames of reference"):
        load_study(_write(tmp_path, _series(1000, study=study, frame=frame),
                          _series(None, study=study, frame=generate_uid(), adc=True)))


def test_refuses_non_overlapping_adc(tmp_path: Path, uids: tuple[str, str]) -> None:
    study, frame = uids
    adc = _series(None, study=study, frame=frame, adc=True)
    for ds in adc:
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                   float(ds.ImagePositionPatient[2]) + 500.0]
    with pytest.raises(GeometryError, match="non-overlapping"):
        load_study(_write(tmp_path, _series(1000, study=study, frame=frame), adc))


def test_refuses_too_few_slices(uids: tuple[str, str]) -> None:
    with pytest.raises(GeometryError, match="too few slices"):
        stack_slices(_series(1000, study=uids[0], frame=uids[1], n=2))


def test_refuses_missing_slice(uids: tuple[str, str]) -> None:
    series = _series(1000, study=uids[0], frame=uids[1])
    del series[5]
    with pytest.raises(GeometryError, match="inconsistent slice spacing"):
        stack_slices(series)


def test_refuses_duplicate_slice(uids: tuple[str, str]) -> None:
    series = _series(1000, study=uids[0], frame=uids[1])
    twin = copy.deepcopy(series[3])
    twin.SOPInstanceUID = generate_uid()
    with pytest.raises(GeometryError, match="duplicate"):
        stack_slices([*series, twin])


def test_refuses_unreadable_pixels(tmp_path: Path, uids: tuple[str, str]) -> None:
    study, frame = uids
    b1000 = _series(1000, study=study, frame=frame)
    b1000[4].PixelData = b1000[4].PixelData[:100]  # truncated
    with pytest.raises(UnreadableImage):
        load_study(_write(tmp_path, _series(0, study=study, frame=frame), b1000))


def test_oblique_volume_is_stacked_along_its_normal(uids: tuple[str, str]) -> None:
    series = _series(1000, study=uids[0], frame=uids[1])
    angle = np.deg2rad(20)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(angle), np.sin(angle)])
    normal = np.cross(row, col)
    for i, ds in enumerate(series):
        ds.ImageOrientationPatient = [*row, *col]
        ds.ImagePositionPatient = list(np.array([-50.0, -50.0, 0.0]) + i * 5.5 * normal)
    volume, ordered = stack_slices(list(reversed(series)))
    assert [d.SOPInstanceUID for d in ordered] == [d.SOPInstanceUID for d in series]
    assert np.allclose(volume.slice_cosine, normal)
    assert volume.slice_spacing == pytest.approx(5.5)
