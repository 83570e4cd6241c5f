"""Intake on real-scanner conventions: b0 only from the DWI's own acquisition (issue 10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.errors import (
    GeometryError,
    IncompleteStudy,
    MissingADC,
    NoDiffusionSeries,
    NoHighBValue,
    StudyRefused,
    UnreadableImage,
)
from service.intake import load_study
from tests.dicom_factory import make_dwi_series, write_series

N = 12


def _series(b: float, study: str, frame: str, *, rows: int = 32, value: float = 1000.0,
            echo_time: str = "89", series_number: int = 5) -> list[Dataset]:
    series = make_dwi_series(N, rows, rows, b_value=b, study_instance_uid=study,
                             frame_of_reference_uid=frame)
    for ds in series:
        ds.EchoTime = echo_time
        ds.SeriesNumber = series_number
        ds.PixelData = np.full((rows, rows), round(value), dtype=np.uint16).tobytes()
        if b == 0:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
    return series


def _write(tmp_path: Path, *groups: list[Dataset]) -> list[Path]:
    paths: list[Path] = []
    for i, group in enumerate(groups):
        paths += write_series(group, tmp_path / f"s{i}")
    return paths


def test_b0_of_another_acquisition_is_never_used(tmp_path: Path) -> None:
    """A T1 that a vendor marks b = 0 (GE, Philips) must not become the ADC's S0."""
    study, frame = generate_uid(), generate_uid()
    dwi = _series(1000, study, frame, value=1000 * np.exp(-0.8))
    mprage = _series(0, study, frame, echo_time="2.98", series_number=3)
    with pytest.raises(MissingADC, match="never used") as refused:
        load_study(_write(tmp_path, dwi, mprage))
    assert "echo time 2.98 ms" in refused.value.reason
    assert "series 3" in refused.value.reason


def test_b0_of_another_grid_is_never_used(tmp_path: Path) -> None:
    study, frame = generate_uid(), generate_uid()
    dwi = _series(1000, study, frame, value=1000 * np.exp(-0.8))
    other = _series(0, study, frame, rows=48, series_number=7)
    with pytest.raises(MissingADC, match="matrix 48x48"):
        load_study(_write(tmp_path, dwi, other))


def test_b0_in_a_separate_series_of_the_same_acquisition_is_used(tmp_path: Path) -> None:
    study, frame = generate_uid(), generate_uid()
    dwi = _series(1000, study, frame, value=1000 * np.exp(-0.8))
    b0 = _series(0, study, frame, series_number=4)
    mprage = _series(0, study, frame, echo_time="2.98", series_number=3)
    result = load_study(_write(tmp_path, dwi, b0, mprage))
    assert np.median(result.adc.voxels) == pytest.approx(800.0, rel=0.01)
    assert any("series 4" in note for note in result.notes)


def test_only_b0_images_are_no_diffusion_series(tmp_path: Path) -> None:
    """GE fMRI / Philips ASL: b = 0 on every image, and no diffusion-weighted image at all."""
    study, frame = generate_uid(), generate_uid()
    fmri = _series(0, study, frame, echo_time="30", series_number=9)
    with pytest.raises(NoDiffusionSeries, match="only images with b = 0 \\(series 9\\)"):
        load_study(_write(tmp_path, fmri))


# --------------------------------------------------------------------------
# Incomplete studies: never filled in (issue 10, item 8)


def _adc(study: str, frame: str, *, series_number: int = 6) -> list[Dataset]:
    series = _series(1000, study, frame, value=800, series_number=series_number)
    for ds in series:
        del ds.DiffusionBValue
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
    return series


def test_adc_covering_part_of_the_dwi_is_refused(tmp_path: Path) -> None:
    study, frame = generate_uid(), generate_uid()
    dwi = _series(1000, study, frame, value=400)
    adc = _adc(study, frame)[:8]
    with pytest.raises(IncompleteStudy, match=r"ADC map covers 8 of 12 DWI slices .*slice\(s\) 9-12"):
        load_study(_write(tmp_path, dwi, adc))


def test_adc_shifted_in_plane_is_refused(tmp_path: Path) -> None:
    """A 30 mm shift in the ADC's header: every slice is 'covered', but the head is elsewhere."""
    study, frame = generate_uid(), generate_uid()
    dwi = make_dwi_series(N, 64, 64, study_instance_uid=study, frame_of_reference_uid=frame)
    adc = make_dwi_series(N, 64, 64, study_instance_uid=study, frame_of_reference_uid=frame)
    for ds in adc:
        del ds.DiffusionBValue
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        ds.PixelData = np.where(ds.pixel_array > 200, 800, 0).astype(np.uint16).tobytes()
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + 30.0, y, z]
    with pytest.raises(GeometryError, match="does not line up .* (2[5-9]|3[0-5]) mm apart"):
        load_study(_write(tmp_path, dwi, adc))
    aligned = [ds for ds in make_dwi_series(N, 64, 64, study_instance_uid=study, frame_of_reference_uid=frame)]
    for ds in aligned:  # the same map on another grid (every other pixel) is fine
        del ds.DiffusionBValue
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        ds.PixelData = np.where(ds.pixel_array[::2, ::2] > 200, 800, 0).astype(np.uint16).tobytes()
        ds.Rows = ds.Columns = 32
        ds.PixelSpacing = [7.0, 7.0]
    result = load_study(_write(tmp_path / "aligned", dwi, aligned))
    assert any("resampled" in note for note in result.notes)


def test_large_bright_infarct_does_not_look_misaligned(tmp_path: Path) -> None:
    """A third of the head bright on DWI must not move 'the head' off the ADC's."""
    study, frame = generate_uid(), generate_uid()
    dwi = make_dwi_series(N, 64, 64, study_instance_uid=study, frame_of_reference_uid=frame)
    adc = make_dwi_series(N, 64, 64, study_instance_uid=study, frame_of_reference_uid=frame)
    for ds in dwi:
        pixels = ds.pixel_array.astype(np.float64)
        pixels[:, :24] = np.where(pixels[:, :24] > 200, 3000, pixels[:, :24])  # the infarct
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    for ds in adc:
        del ds.DiffusionBValue
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        head = ds.pixel_array[::2, ::2] > 200
        values = np.where(head, 800, 0)
        values[:, :12] = np.where(head[:, :12], 450, 0)
        ds.PixelData = values.astype(np.uint16).tobytes()
        ds.Rows = ds.Columns = 32
        ds.PixelSpacing = [7.0, 7.0]
    result = load_study(_write(tmp_path, dwi, adc))
    assert any("resampled" in note for note in result.notes)


def test_dwi_cut_short_is_refused(tmp_path: Path) -> None:
    """4 of 12 high-b slices arrived; the b0 of the same series has all 12 positions."""
    study, frame = generate_uid(), generate_uid()
    dwi = _series(1000, study, frame, value=1000 * np.exp(-0.8))
    b0 = _series(0, study, frame)
    for ds in b0:
        ds.SeriesInstanceUID = dwi[0].SeriesInstanceUID
    with pytest.raises(IncompleteStudy, match=r"DWI incomplete: 4 of 12 slices"):
        load_study(_write(tmp_path, dwi[:4], b0))
    # the same with a scanner ADC of the same acquisition as the witness
    with pytest.raises(IncompleteStudy, match=r"DWI incomplete: 4 of 12 slices .*adc"):
        load_study(_write(tmp_path / "adc", dwi[:4], _adc(study, frame)))


def test_other_acquisition_with_more_slices_is_no_witness(tmp_path: Path) -> None:
    """A thin-slice DWI of another protocol in the same frame of reference proves nothing."""
    study, frame = generate_uid(), generate_uid()
    dwi = _series(1000, study, frame, value=400)
    adc = _adc(study, frame)
    thin = make_dwi_series(30, 32, 32, b_value=0.0, study_instance_uid=study, frame_of_reference_uid=frame,
                           slice_thickness=2.0, slice_gap=0.0)
    for ds in thin:
        ds.SeriesNumber = 11
        ds.ProtocolName = "ep2d_diff_brainstem"
    result = load_study(_write(tmp_path, dwi, adc, thin))
    assert result.dwi.shape[0] == N


def test_computed_adc_of_no_head_is_refused(tmp_path: Path) -> None:
    """A 'b0' no brighter than the b1000 gives ADC 0 everywhere: refused, never 'ok 29.84 mL'."""
    study, frame = generate_uid(), generate_uid()
    dwi = _series(1000, study, frame, value=400)
    b0 = _series(0, study, frame, value=380)
    for ds in b0:
        ds.SeriesInstanceUID = dwi[0].SeriesInstanceUID
    with pytest.raises(StudyRefused, match=r"computed ADC implausible: median 0 "):
        load_study(_write(tmp_path, dwi, b0))


def test_undecodable_slice_is_refused_naming_the_file(tmp_path: Path) -> None:
    study, frame = generate_uid(), generate_uid()
    dwi = _series(1000, study, frame, value=1000 * np.exp(-0.8))
    b0 = _series(0, study, frame)
    for ds in b0:
        ds.SeriesInstanceUID = dwi[0].SeriesInstanceUID
    paths = _write(tmp_path, dwi, b0)
    broken = pydicom.dcmread(paths[5])
    broken.file_meta.TransferSyntaxUID = "1.2.999.1"  # no decoder knows it
    broken.save_as(paths[5], enforce_file_format=False)
    with pytest.raises(UnreadableImage, match=rf"file {paths[5].name}\).*NotImplementedError.*1\.2\.999\.1"):
        load_study(paths)


# --------------------------------------------------------------------------
# Directional-only acquisitions (issue 10, items 2 and 3)

#: An anisotropic tensor (1e-3 mm2/s) with mean diffusivity 0.8.
TENSOR = np.diag([1.7, 0.3, 0.4]) * 1e-3
BALANCED_6 = [(1, 1, 0), (1, -1, 0), (1, 0, 1), (1, 0, -1), (0, 1, 1), (0, 1, -1)]
UNBALANCED_6 = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1)]


def _directional_study(directions: list[tuple[int, int, int]], *, manufacturer: str = "SIEMENS",
                       b0_b_value: bool = True) -> list[Dataset]:
    """b0 + one b=1000 image per direction and slice, all in one series, signal S0 exp(-b g'Dg)."""
    study, frame = generate_uid(), generate_uid()
    series_uid = generate_uid()
    out: list[Dataset] = []
    for k, direction in enumerate([None, *directions]):
        series = make_dwi_series(N, 32, 32, b_value=0.0 if direction is None else 1000.0,
                                 study_instance_uid=study, frame_of_reference_uid=frame)
        g = None if direction is None else np.asarray(direction, float) / np.linalg.norm(direction)
        value = 1000.0 if g is None else 1000.0 * np.exp(-1000.0 * g @ TENSOR @ g)
        for ds in series:
            ds.SeriesInstanceUID = series_uid
            ds.Manufacturer = manufacturer
            ds.InstanceNumber = k * N + int(ds.InstanceNumber)
            ds.SOPInstanceUID = generate_uid()
            ds.PixelData = np.full((32, 32), round(value), dtype=np.uint16).tobytes()
            if g is None:
                if not b0_b_value:
                    del ds.DiffusionBValue  # the Canon/Toshiba convention
                ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
            else:
                ds.DiffusionGradientOrientation = [float(v) for v in g]
        out += series
    return out


def test_canon_b0_without_b_value_beside_directional_images(tmp_path: Path) -> None:
    """Toshiba V5 DTI: b0 images carry no b-value; the b > 0 images are directional."""
    paths = write_series(_directional_study(BALANCED_6, manufacturer="TOSHIBA", b0_b_value=False), tmp_path)
    result = load_study(paths)
    assert result.adc_origin == "computed"
    assert np.median(result.adc.voxels) == pytest.approx(800.0, rel=0.01)


def test_unbalanced_directions_are_fitted_as_a_tensor(tmp_path: Path) -> None:
    paths = write_series(_directional_study(UNBALANCED_6), tmp_path)
    result = load_study(paths)
    assert any("diffusion-tensor fit of 6 directional images" in note for note in result.notes)
    # the trace of an anisotropic tensor: exp(-b MD) exactly, whatever the directions
    assert np.median(result.dwi.voxels) == pytest.approx(1000.0 * np.exp(-0.8), rel=0.01)
    assert np.median(result.adc.voxels) == pytest.approx(800.0, rel=0.01)


def test_coplanar_directions_are_refused_with_an_accurate_hint(tmp_path: Path) -> None:
    angles = np.linspace(0, np.pi, 12, endpoint=False)
    coplanar = [(float(np.cos(a)), float(np.sin(a)), 0.0) for a in angles]
    paths = write_series(_directional_study(coplanar), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(NoHighBValue, match=r"their 12 gradient direction\(s\) .* \(3 independent"):
        load_study(paths)


# --------------------------------------------------------------------------
# UIH (issue 10, item 4)


def _uih(series: list[Dataset], b: float) -> list[Dataset]:
    for ds in series:
        ds.Manufacturer = "UIH"
        del ds.DiffusionBValue
        ds.add_new((0x0065, 0x0010), "LO", "Image Private Header")
        ds.add_new((0x0065, 0x1009), "FD", b)
    return series


def test_uih_b_value_from_its_private_element(tmp_path: Path) -> None:
    study, frame = generate_uid(), generate_uid()
    dwi = _uih(_series(1000, study, frame, value=1000 * np.exp(-0.8)), 1000.0)
    b0 = _uih(_series(0, study, frame), 0.0)
    for ds in b0:
        ds.SeriesInstanceUID = dwi[0].SeriesInstanceUID
    result = load_study(_write(tmp_path, dwi, b0))
    assert result.b_value == 1000
    assert any("UIH (0065,1009)" in note for note in result.notes)
    assert np.median(result.adc.voxels) == pytest.approx(800.0, rel=0.01)


def test_uih_vframe_is_refused_with_its_own_reason(tmp_path: Path) -> None:
    study, frame = generate_uid(), generate_uid()
    dwi = _uih(_series(1000, study, frame), 1000.0)
    for ds in dwi:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "VFRAME"]
    with pytest.raises(NoDiffusionSeries, match="UIH \\(uMR\\) VFRAME"):
        load_study(_write(tmp_path, dwi))
