"""SEG, SR and overlay on Enhanced MR and Siemens MOSAIC DWI, checked against the phantom truth.

One phantom is generated per module and re-encoded by
:func:`models.synth.write_vendor_study` as one Enhanced MR object holding b0
and b1000 frames (``enhanced``, ``enhanced_classic_adc``) and as b0/b1000
MOSAIC images (``siemens_mosaic``); intake reads each back and
:func:`service.derive.write_results` writes the *truth* mask with
``DerivationSources.from_study(study)``.  Every SEG frame must lie on
the phantom's slice with the truth's pixels, reference its b1000 frame (or
the mosaic), and the SR/overlay must reference the right objects; dciodvfy
must find no Error.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from models.synth import PhantomStudy, VendorConvention, generate_phantom, write_vendor_study
from service.config import BUNDLED_MODEL_DIR
from service.derive import (
    CORE_VOLUME_CUTOFFS_ML,
    AlgorithmInfo,
    DerivationSources,
    DeriveOptions,
    GridGeometry,
    LesionMask,
    OverlayOptions,
    ResultUIDs,
    compute_lesion_findings,
    read_lesion_findings,
    read_lesion_volume_ml,
    stable_uid,
    write_results,
)
from service.domain import DiffusionStudy, ImageVolume, ResultObject, SourceFrame
from service.intake import load_study
from tests.peers import dciodvfy_errors

SEED = 311  # < 1000: never a training case (as tests/test_vendors.py)
ENHANCED = VendorConvention.ENHANCED
ENHANCED_CLASSIC_ADC = VendorConvention.ENHANCED_CLASSIC_ADC
MOSAIC = VendorConvention.SIEMENS_MOSAIC
CONVENTIONS = [ENHANCED, ENHANCED_CLASSIC_ADC, MOSAIC]
ALGORITHM = AlgorithmInfo(name="strokeseg-unet", version="1.2.0", parameters={"threshold": "0.5"})
MODEL_DIR = BUNDLED_MODEL_DIR  # the model `strokeseg serve` uses by default


@dataclasses.dataclass(frozen=True)
class Written:
    case: Path
    study: DiffusionStudy
    results: list[ResultObject]
    volume_ml: float

    @property
    def seg(self) -> ResultObject:
        return self.results[0]

    @property
    def sr(self) -> ResultObject:
        return self.results[1]

    @property
    def overlay(self) -> list[ResultObject]:
        return self.results[2:]


@pytest.fixture(scope="module")
def phantom() -> PhantomStudy:
    return generate_phantom(SEED, lesion_class="medium", matrix=128)


@pytest.fixture(scope="module")
def encoded(
    phantom: PhantomStudy, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[VendorConvention], tuple[Path, DiffusionStudy]]:
    root = tmp_path_factory.mktemp("vendors")
    cache: dict[VendorConvention, tuple[Path, DiffusionStudy]] = {}

    def encode(convention: VendorConvention) -> tuple[Path, DiffusionStudy]:
        if convention not in cache:
            case = write_vendor_study(phantom, root / convention.value, convention)
            cache[convention] = (case, load_study(_files(case)))
        return cache[convention]

    return encode


@pytest.fixture(scope="module")
def written(
    phantom: PhantomStudy,
    encoded: Callable[[VendorConvention], tuple[Path, DiffusionStudy]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[VendorConvention], Written]:
    """write_results of the truth mask on each encoding, once per module."""
    root = tmp_path_factory.mktemp("derived")
    cache: dict[VendorConvention, Written] = {}

    def write(convention: VendorConvention) -> Written:
        if convention not in cache:
            case, study = encoded(convention)
            mask = phantom.mask.astype(bool)
            volume_ml = float(mask.sum()) * study.dwi.voxel_volume_ml
            findings = compute_lesion_findings(
                mask,
                mask.astype(np.float32),
                study.adc.voxels,
                study.adc.voxels > 0,
                GridGeometry.from_volume(study.dwi),
                input_quality="phantom",
            )
            results = write_results(
                DerivationSources.from_study(study),
                LesionMask(mask, volume_ml),
                findings,
                ALGORITHM,
                root / convention.value,
                DeriveOptions(
                    uids=ResultUIDs(
                        overlay_series_instance_uid=stable_uid(convention.value, "overlay")
                    ),
                    core_volume_cutoffs_ml=CORE_VOLUME_CUTOFFS_ML,
                    overlay=OverlayOptions(),
                ),
            )
            cache[convention] = Written(case, study, results, volume_ml)
        return cache[convention]

    return write


def _files(case: Path) -> list[Path]:
    return sorted((case / "dicom").glob("*.dcm"))


def _dwi_object(written: Written) -> Dataset:
    """The one object (Enhanced MR or b1000 MOSAIC) that holds the DWI slices."""
    (path,) = {frame.path for frame in written.study.dwi_sources}
    return pydicom.dcmread(path, stop_before_pixels=True)


def _b1000_frames(ds: Dataset) -> dict[int, npt.NDArray[np.float64]]:
    """Frame number -> ImagePositionPatient of the b1000 frames of an Enhanced MR object."""
    frames = {}
    for number, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        if float(item.MRDiffusionSequence[0].DiffusionBValue) == 1000:
            position = item.PlanePositionSequence[0].ImagePositionPatient
            frames[number] = np.array([float(v) for v in position])
    return frames


def _truth_slice(phantom: PhantomStudy, position: object) -> int:
    """The phantom slice whose ImagePositionPatient is ``position`` (within 1 um)."""
    p = np.array([float(v) for v in position])  # type: ignore[attr-defined]
    geo = phantom.geometry
    distances = [
        float(np.linalg.norm(p - np.asarray(geo.position(k)))) for k in range(geo.shape[0])
    ]
    k = int(np.argmin(distances))
    assert distances[k] < 1e-3, f"{p} is on no phantom slice (nearest {distances[k]:.4f} mm)"
    return k


# ------------------------------------------------------------------------- SEG


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.value)
def test_seg_frames_lie_on_the_phantom_slices_with_the_truth(
    convention: VendorConvention,
    phantom: PhantomStudy,
    written: Callable[[VendorConvention], Written],
) -> None:
    result = written(convention)
    seg = pydicom.dcmread(result.seg.path)
    geo = phantom.geometry
    n, rows, columns = geo.shape
    assert seg.SOPClassUID == SegmentationStorage
    assert (int(seg.Rows), int(seg.Columns), int(seg.NumberOfFrames)) == (rows, columns, n)
    assert seg.StudyInstanceUID == result.study.study_instance_uid
    assert seg.FrameOfReferenceUID == result.study.frame_of_reference_uid

    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [*geo.row_cosine, *geo.column_cosine],
        atol=1e-6,
    )
    measures = shared.PixelMeasuresSequence[0]
    np.testing.assert_allclose([float(v) for v in measures.PixelSpacing], geo.pixel_spacing)
    assert float(measures.SpacingBetweenSlices) == pytest.approx(geo.slice_spacing, abs=1e-3)
    assert float(measures.SliceThickness) == pytest.approx(geo.slice_thickness, abs=1e-3)

    pixels = seg.pixel_array.reshape(n, rows, columns)
    slices = []
    for f, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        k = _truth_slice(phantom, frame.PlanePositionSequence[0].ImagePositionPatient)
        slices.append(k)
        np.testing.assert_array_equal(pixels[f].astype(bool), phantom.mask[k].astype(bool))
    assert sorted(slices) == list(range(n))  # every slice exactly once
    assert phantom.mask.any()

    # What a receiver reading it with highdicom gets: the truth on the phantom grid.
    volume = hd.seg.segread(result.seg.path).get_volume(combine_segments=True)
    assert volume.spatial_shape == (n, rows, columns)
    first = _truth_slice(phantom, volume.position)
    assert first in (0, n - 1)
    truth = phantom.mask if first == 0 else phantom.mask[::-1]
    np.testing.assert_array_equal(volume.array.astype(bool), truth.astype(bool))


@pytest.mark.parametrize("convention", [ENHANCED, ENHANCED_CLASSIC_ADC], ids=lambda c: c.value)
def test_enhanced_seg_references_each_b1000_frame(
    convention: VendorConvention,
    phantom: PhantomStudy,
    written: Callable[[VendorConvention], Written],
) -> None:
    result = written(convention)
    source = _dwi_object(result)
    b1000 = _b1000_frames(source)
    assert len(b1000) == phantom.geometry.shape[0]
    seg = pydicom.dcmread(result.seg.path, stop_before_pixels=True)

    referenced = []
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (derivation,) = frame.DerivationImageSequence
        assert derivation.DerivationCodeSequence[0].CodeValue == "113076"
        (item,) = derivation.SourceImageSequence  # the b1000 frame only, not the b0 beside it
        assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert item.ReferencedSOPClassUID == source.SOPClassUID
        assert item.SpatialLocationsPreserved == "YES"
        number = int(item.ReferencedFrameNumber)
        assert number in b1000
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, b1000[number], atol=1e-6)
        referenced.append(number)
    assert sorted(referenced) == sorted(b1000)

    assert [i.ReferencedSOPInstanceUID for i in seg.SourceImageSequence] == [source.SOPInstanceUID]
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == result.study.dwi_series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == [
        source.SOPInstanceUID
    ]

    # A receiver that maps frames by reference finds the truth on the b1000 frames.
    numbers = [f.frame_number for f in result.study.dwi_sources]
    assert all(n is not None for n in numbers)
    by_reference = hd.seg.segread(result.seg.path).get_pixels_by_source_frame(
        source_sop_instance_uid=source.SOPInstanceUID,
        source_frame_numbers=numbers,  # type: ignore[arg-type]
        segment_numbers=[1],
    )
    truth = np.stack([phantom.mask[_truth_slice(phantom, b1000[n])] for n in numbers])  # type: ignore[index]
    np.testing.assert_array_equal(by_reference[..., 0].astype(bool), truth.astype(bool))


def test_mosaic_seg_references_the_mosaic_at_image_level(
    written: Callable[[VendorConvention], Written],
) -> None:
    result = written(MOSAIC)
    mosaic = _dwi_object(result)
    assert "MOSAIC" in mosaic.ImageType and int(mosaic.Rows) > int(result.study.dwi.shape[1])
    seg = pydicom.dcmread(result.seg.path, stop_before_pixels=True)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        # No reference can address a tile: none per frame (frames are placed by position).
        assert len(frame.DerivationImageSequence) == 0
    (item,) = seg.SourceImageSequence
    assert item.ReferencedSOPInstanceUID == mosaic.SOPInstanceUID
    assert "ReferencedFrameNumber" not in item
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == mosaic.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == [
        mosaic.SOPInstanceUID
    ]


# -------------------------------------------------------------------------- SR


def _image_items(items: Iterable[Dataset]) -> list[Dataset]:
    """The SR's IMAGE content items below ``items``, depth first."""
    found = []
    for item in items:
        if item.ValueType == "IMAGE":
            found.append(item)
        found.extend(_image_items(item.get("ContentSequence", [])))
    return found


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.value)
def test_sr_reads_back_and_references_the_dwi_object(
    convention: VendorConvention, written: Callable[[VendorConvention], Written]
) -> None:
    result = written(convention)
    source = _dwi_object(result)
    sr = pydicom.dcmread(result.sr.path)
    assert read_lesion_volume_ml(sr) == pytest.approx(result.volume_ml, rel=1e-6)
    findings = read_lesion_findings(sr)
    assert findings.lesion_present and findings.lesion_count is not None
    assert findings.lesion_count >= 1
    for lesion in findings.lesions:
        assert lesion.source_sop_instance_uids == (str(source.SOPInstanceUID),)
        assert lesion.instance_numbers is None  # frames/tiles share their object's number

    # The slice range names what a reader finds in the source: frame or tile numbers,
    # never "InstanceNumber unknown to unknown" (issue 10, item 7).
    ranges = [t for t in _texts(sr.ContentSequence) if t.endswith(f"of {len(result.study.dwi_sources)}")]
    assert ranges and not any("unknown" in t for t in ranges), ranges
    kind = "MOSAIC tile" if convention is MOSAIC else "frame"
    assert all(t.startswith(kind + " ") for t in ranges), ranges
    if convention is not MOSAIC:
        for text in ranges:
            first, last = (int(v) for v in text.split(";")[0].split()[1::2])
            assert {first, last} <= set(_b1000_frames(source))

    evidence = {
        str(ref.ReferencedSOPInstanceUID)
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {str(source.SOPInstanceUID), result.seg.sop_instance_uid}

    images = _image_items(sr.ContentSequence)
    source_images = [
        i
        for i in images
        if i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    ]
    assert source_images, "the SR references no DWI source"
    main = source_images[0].ReferencedSOPSequence[0]  # the lesion segment's source images
    if convention is MOSAIC:
        assert all("ReferencedFrameNumber" not in i.ReferencedSOPSequence[0] for i in source_images)
    else:
        assert sorted(int(v) for v in main.ReferencedFrameNumber) == sorted(_b1000_frames(source))
        for item in source_images:
            frames = item.ReferencedSOPSequence[0].ReferencedFrameNumber
            frames = [frames] if isinstance(frames, int | str) else frames
            assert {int(v) for v in frames} <= set(_b1000_frames(source))


def _texts(items: Sequence[Dataset]) -> list[str]:
    """Every TEXT value in an SR content tree."""
    out: list[str] = []
    for item in items:
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out += _texts(item.get("ContentSequence", []))
    return out


# --------------------------------------------------------------------- overlay


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.value)
def test_overlay_one_image_per_slice_referencing_its_frame(
    convention: VendorConvention,
    phantom: PhantomStudy,
    written: Callable[[VendorConvention], Written],
) -> None:
    result = written(convention)
    source = _dwi_object(result)
    n = phantom.geometry.shape[0]
    assert len(result.overlay) == n
    assert len({o.sop_instance_uid for o in result.overlay}) == n
    sources = result.study.dwi_sources
    scanner_order = sorted(range(n), key=lambda k: _within_object(sources[k]))
    frames = []
    for position, (obj, k) in enumerate(zip(result.overlay, scanner_order, strict=True), 1):
        ds = pydicom.dcmread(obj.path)
        assert int(ds.InstanceNumber) == position
        (item,) = ds.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
        if convention is MOSAIC:
            assert "ReferencedFrameNumber" not in item
        else:
            frames.append(int(item.ReferencedFrameNumber))
        # The red outline is drawn exactly on the images of the truth's lesion slices.
        red = (ds.pixel_array == (255, 0, 0)).all(axis=-1)
        assert red.any() == phantom.mask[k].any(), f"overlay image {position}, slice {k}"
    if convention is not MOSAIC:
        assert frames == sorted(_b1000_frames(source))  # the object's frame order


# -------------------------------------------------------------------- dciodvfy


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.value)
def test_outputs_pass_dciodvfy(
    convention: VendorConvention,
    phantom: PhantomStudy,
    written: Callable[[VendorConvention], Written],
) -> None:
    result = written(convention)
    # Overlay images follow the frame/tile order; pick one that shows the lesion.
    sources = result.study.dwi_sources
    scanner_order = sorted(range(len(sources)), key=lambda k: _within_object(sources[k]))
    with_lesion = next(
        obj for obj, k in zip(result.overlay, scanner_order, strict=True) if phantom.mask[k].any()
    )
    for obj in [result.seg, result.sr, result.overlay[0], with_lesion]:
        errors = dciodvfy_errors(obj.path)
        assert errors == [], (obj.kind, errors)


def _within_object(frame: SourceFrame) -> int:
    index = frame.frame_number if frame.frame_number is not None else frame.mosaic_index
    assert index is not None
    return index


# ------------------------------------------------------------- wiring mistakes


def test_wiring_mistakes_are_refused_before_anything_is_written(
    phantom: PhantomStudy,
    encoded: Callable[[VendorConvention], tuple[Path, DiffusionStudy]],
    tmp_path: Path,
) -> None:
    _, enhanced = encoded(ENHANCED)
    _, mosaic = encoded(MOSAIC)
    mask = phantom.mask.astype(bool)
    volume_ml = float(mask.sum()) * enhanced.dwi.voxel_volume_ml
    out = tmp_path / "out"

    def write(sources: Sequence[SourceFrame], dwi: ImageVolume | None) -> None:
        write_results(
            DerivationSources(tuple(sources), dwi), LesionMask(mask, volume_ml), None, ALGORITHM, out
        )

    with pytest.raises(ValueError, match="does not lie on slice"):
        write(enhanced.dwi_sources[::-1], enhanced.dwi)
    with pytest.raises(ValueError, match="need the DWI volume"):
        write(mosaic.dwi_sources, None)
    with pytest.raises(ValueError, match="mix layouts"):
        mixed = (dataclasses.replace(enhanced.dwi_sources[0], frame_number=None),)
        write(mixed + enhanced.dwi_sources[1:], enhanced.dwi)
    with pytest.raises(ValueError, match="source of two slices"):
        write(enhanced.dwi_sources[:-1] + enhanced.dwi_sources[-2:-1], enhanced.dwi)
    with pytest.raises(ValueError, match="source of two slices"):
        write(mosaic.dwi_sources[:-1] + mosaic.dwi_sources[-2:-1], mosaic.dwi)
    # There is no second list of paths to disagree with the frames any more (issue 13); the
    # nearest mistake, frames pointing at another object's file, is refused instead.
    with pytest.raises(ValueError, match="is another object"):
        elsewhere = Path(mosaic.dwi_sources[0].path)
        write([dataclasses.replace(f, path=elsewhere) for f in enhanced.dwi_sources], enhanced.dwi)
    assert not out.exists()


def test_classic_sources_given_as_frames_are_written_as_before(
    phantom: PhantomStudy,
    encoded: Callable[[VendorConvention], tuple[Path, DiffusionStudy]],
    tmp_path: Path,
) -> None:
    """sources= for classic images (what the pipeline will pass for most studies) changes nothing."""
    _, study = encoded(VendorConvention.STANDARD)
    mask = phantom.mask.astype(bool)
    volume_ml = float(mask.sum()) * study.dwi.voxel_volume_ml
    paths = [frame.path for frame in study.dwi_sources]
    seg_uid = stable_uid("classic", "seg")
    overlay_uid = stable_uid("classic", "overlay")
    options = DeriveOptions(
        uids=ResultUIDs(seg_sop_instance_uid=seg_uid, overlay_series_instance_uid=overlay_uid),
        overlay=OverlayOptions(),
    )
    by_frames = write_results(
        DerivationSources.from_study(study),
        LesionMask(mask, volume_ml),
        None,
        ALGORITHM,
        tmp_path / "frames",
        options,
    )
    by_paths = write_results(
        DerivationSources.from_paths(paths, dwi=study.dwi),
        LesionMask(mask, volume_ml),
        None,
        ALGORITHM,
        tmp_path / "paths",
        options,
    )

    def frame_references(result: ResultObject) -> list[tuple[str, list[float]]]:
        seg = pydicom.dcmread(result.path, stop_before_pixels=True)
        return [
            (
                str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID),
                [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient],
            )
            for f in seg.PerFrameFunctionalGroupsSequence
        ]

    references = frame_references(by_frames[0])
    assert references == frame_references(by_paths[0])
    assert {uid for uid, _ in references} == {f.sop_instance_uid for f in study.dwi_sources}
    assert [r.sop_instance_uid for r in by_frames[2:]] == [r.sop_instance_uid for r in by_paths[2:]]


# --------------------------------------------------------------- the pipeline


def _pipeline_with_sources() -> types.ModuleType:
    """service.pipeline, which passes the study's frames and DWI volume to derive
    (``DerivationSources.from_study``) since issue 13."""
    import service.pipeline

    return service.pipeline


@pytest.mark.parametrize("convention", [ENHANCED, MOSAIC], ids=lambda c: c.value)
def test_segment_files_with_sources_and_dwi(
    convention: VendorConvention,
    encoded: Callable[[VendorConvention], tuple[Path, DiffusionStudy]],
    tmp_path: Path,
) -> None:
    """segment_files on these encodings once pipeline.py passes sources= and dwi=."""
    from service.inference import cached_model

    case, _ = encoded(convention)
    pipeline = _pipeline_with_sources()
    result = pipeline.segment_files(_files(case), cached_model(MODEL_DIR), tmp_path, overlay=True)
    kinds = [o.kind for o in result.objects]
    assert kinds[:2] == ["SEG", "SR"] and len(kinds) == 2 + result.study.dwi.shape[0]
    sr = pydicom.dcmread(result.objects[1].path)
    assert read_lesion_volume_ml(sr) == pytest.approx(result.segmentation.lesion_volume_ml)
