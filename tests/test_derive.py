"""Round trips of the derived DICOM objects (SEG, TID 1500 SR) through files,
and the lesion findings the SR reports, checked against hand-made masks.

Every object is written, read back with pydicom/highdicom as a receiver
would, and (where dicom3tools is installed) checked with ``dciodvfy -new``.
Sources are synthetic classic MR DWI images from :mod:`tests.dicom_factory`,
complete like a scanner's, and deliberately sloppy variants of them.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from scipy import ndimage

from service.derive import (
    CORE_VOLUME_CUTOFFS_ML,
    AlgorithmInfo,
    DerivationSources,
    DeriveOptions,
    GridGeometry,
    LesionFindings,
    LesionMask,
    OverlayOptions,
    ResultUIDs,
    VolumeClass,
    build_lesion_seg,
    build_volume_report,
    compute_lesion_findings,
    grid_geometry,
    read_lesion_findings,
    read_lesion_volume_ml,
    stable_uid,
    write_results,
)
from service.domain import DiffusionMimic, DomainOfValidity, ImageVolume, ResultObject
from tests.dicom_factory import make_dwi_series, make_sloppy, write_series
from tests.peers import dciodvfy_errors

N_SLICES, ROWS, COLUMNS = 20, 64, 64
ALGORITHM = AlgorithmInfo(
    name="strokeseg-unet", version="1.2.0", parameters={"threshold": "0.5", "tta": "flip"}
)


# --------------------------------------------------------------------- helpers


def _lesion_mask() -> npt.NDArray[np.bool_]:
    """An irregular lesion over three slices (not symmetric, so flips show)."""
    mask = np.zeros((N_SLICES, ROWS, COLUMNS), dtype=bool)
    mask[8, 20:30, 25:33] = True
    mask[9, 18:31, 24:36] = True
    mask[10, 22:26, 28:30] = True
    mask[9, 40, 10] = True
    return mask


_dciodvfy_errors = dciodvfy_errors


def _dcmread_strict(path: Path) -> Dataset:
    """Read as a strict receiver would: every element decoded, invalid values raise."""
    previous = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        ds = pydicom.dcmread(path)
        _decode_all(ds)
    finally:
        config.settings.reading_validation_mode = previous
    return ds


def _decode_all(ds: Dataset) -> None:
    for elem in ds:  # iterating converts raw elements, validating their values
        if elem.VR == "SQ":
            for item in elem.value:
                _decode_all(item)


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _content_items(items: Iterable[Dataset]) -> Iterator[Dataset]:
    """All SR content items below ``items``, depth first."""
    for item in items:
        yield item
        yield from _content_items(item.get("ContentSequence", []))


@pytest.fixture
def source_paths(tmp_path: Path) -> list[Path]:
    return write_series(make_dwi_series(N_SLICES, ROWS, COLUMNS), tmp_path / "src")


@pytest.fixture
def headers(source_paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in source_paths]


# ------------------------------------------------------------------------ SEG


def test_seg_round_trip(headers: list[Dataset], tmp_path: Path) -> None:
    mask = _lesion_mask()
    assert all("PixelData" not in ds for ds in headers)  # headers suffice for highdicom

    seg = build_lesion_seg(headers, mask, algorithm=ALGORITHM)
    ds = _dcmread_strict(_save(seg, tmp_path / "seg.dcm"))

    src = headers[0]
    assert ds.SOPClassUID == SegmentationStorage
    assert ds.Modality == "SEG"
    assert ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert (ds.SeriesNumber, ds.InstanceNumber) == (9901, 1)
    assert ds.SeriesDescription == "Ischemic lesion (strokeseg)"
    assert ds.PatientID == src.PatientID and ds.AccessionNumber == src.AccessionNumber
    # one frame per source slice, even the empty ones
    assert int(ds.NumberOfFrames) == N_SLICES

    source_uids = {h.SOPInstanceUID for h in headers}
    (ref_series,) = ds.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
    assert {
        i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence
    } == source_uids

    # each frame references its own source image, at that image's position
    ipp_by_uid = {h.SOPInstanceUID: [float(v) for v in h.ImagePositionPatient] for h in headers}
    seen = set()
    for frame in ds.PerFrameFunctionalGroupsSequence:
        (derivation,) = frame.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        uid = source.ReferencedSOPInstanceUID
        frame_ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(frame_ipp, ipp_by_uid[uid])
        seen.add(uid)
    assert seen == source_uids

    (segment,) = ds.SegmentSequence
    assert segment.SegmentNumber == 1
    assert segment.SegmentLabel == "Acute ischemic lesion"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
    prop_type = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (prop_type.CodeValue, prop_type.CodingSchemeDesignator) == ("55641003", "SCT")
    assert prop_type.CodeMeaning == "Infarct"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    (algo,) = segment.SegmentationAlgorithmIdentificationSequence
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("strokeseg-unet", "1.2.0")
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert algo.AlgorithmParameters == "threshold=0.5,tta=flip"
    assert segment.TrackingUID

    # pixels, as a receiver reconstructs them
    hd_seg = hd.seg.segread(tmp_path / "seg.dcm")
    per_source = hd_seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in headers], segment_numbers=[1]
    )
    assert np.array_equal(per_source[..., 0].astype(bool), mask)

    volume = hd_seg.get_volume()
    assert volume.array.shape[:3] == mask.shape
    for k in range(volume.array.shape[0]):  # place each volume slice by its geometry
        position = volume.affine[:3, :3] @ np.array([k, 0, 0]) + volume.affine[:3, 3]
        (i,) = [
            j for j, h in enumerate(headers) if np.allclose(position, ipp_by_uid[h.SOPInstanceUID])
        ]
        assert np.array_equal(volume.array[k, ..., 0].astype(bool), mask[i])


def test_seg_from_shuffled_sources_keeps_slice_correspondence(
    headers: list[Dataset], tmp_path: Path
) -> None:
    mask = _lesion_mask()
    order = np.random.default_rng(7).permutation(N_SLICES)
    shuffled = [headers[i] for i in order]
    seg = build_lesion_seg(shuffled, mask[order], algorithm=ALGORITHM)
    hd_seg = hd.seg.segread(_save(seg, tmp_path / "seg.dcm"))
    per_source = hd_seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[h.SOPInstanceUID for h in headers], segment_numbers=[1]
    )
    assert np.array_equal(per_source[..., 0].astype(bool), mask)


def test_seg_accepts_full_datasets_and_given_uids(source_paths: list[Path]) -> None:
    full = [pydicom.dcmread(p) for p in source_paths]
    series_uid, sop_uid = stable_uid("job-1", "seg-series"), stable_uid("job-1", "seg")
    seg = build_lesion_seg(
        full,
        _lesion_mask().astype(np.uint8),
        algorithm=ALGORITHM,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (series_uid, sop_uid)
    assert stable_uid("job-1", "seg") == sop_uid  # deterministic: re-sends replace


def test_empty_mask_gives_valid_seg_and_zero_volume_sr(
    headers: list[Dataset], tmp_path: Path
) -> None:
    mask = np.zeros((N_SLICES, ROWS, COLUMNS), dtype=bool)
    seg = build_lesion_seg(headers, mask, algorithm=ALGORITHM)
    seg_path = _save(seg, tmp_path / "seg.dcm")
    sr = build_volume_report(seg, headers, 0.0, algorithm=ALGORITHM)
    sr_path = _save(sr, tmp_path / "sr.dcm")

    seg_ds = _dcmread_strict(seg_path)
    assert int(seg_ds.NumberOfFrames) == N_SLICES
    assert not hd.seg.segread(seg_path).get_volume().array.any()
    assert read_lesion_volume_ml(_dcmread_strict(sr_path)) == 0.0

    codes_found = {
        (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue)
        for item in _content_items(pydicom.dcmread(sr_path).ContentSequence)
        if item.ValueType == "CODE"
    }
    assert ("121052", "121054") in codes_found  # Presence of property: Absent

    assert _dciodvfy_errors(seg_path) == []
    assert _dciodvfy_errors(sr_path) == []


@pytest.mark.parametrize(
    ("mask_shape", "message"),
    [
        ((N_SLICES - 1, ROWS, COLUMNS), "19 slices but 20 source images"),
        ((N_SLICES, ROWS, COLUMNS - 1), "64x63 but source image 0 is 64x64"),
        ((ROWS, COLUMNS), "must be 3-D"),
    ],
)
def test_shape_mismatch_raises(
    headers: list[Dataset], mask_shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_lesion_seg(headers, np.zeros(mask_shape, dtype=bool), algorithm=ALGORITHM)


def test_bad_inputs_raise(headers: list[Dataset], tmp_path: Path) -> None:
    mask = _lesion_mask()
    with pytest.raises(ValueError, match="boolean"):
        build_lesion_seg(headers, mask.astype(np.float32), algorithm=ALGORITHM)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only 0 and 1"):
        build_lesion_seg(headers, mask.astype(np.uint8) * 2, algorithm=ALGORITHM)
    with pytest.raises(ValueError, match="at least one source image"):
        build_lesion_seg([], mask[:0], algorithm=ALGORITHM)

    other_series = [
        pydicom.dcmread(p, stop_before_pixels=True)
        for p in write_series(
            make_dwi_series(
                N_SLICES,
                ROWS,
                COLUMNS,
                study_instance_uid=headers[0].StudyInstanceUID,
                frame_of_reference_uid=headers[0].FrameOfReferenceUID,
            ),
            tmp_path / "other",
        )
    ]
    with pytest.raises(ValueError, match="share one SeriesInstanceUID"):
        build_lesion_seg([*headers[:10], *other_series[10:]], mask, algorithm=ALGORITHM)
    with pytest.raises(ValueError, match="same SOPInstanceUID"):
        build_lesion_seg([headers[0], *headers[1:-1], headers[0]], mask, algorithm=ALGORITHM)
    no_for = copy.deepcopy(headers)
    del no_for[3].FrameOfReferenceUID
    with pytest.raises(ValueError, match="source image 3 lacks FrameOfReferenceUID"):
        build_lesion_seg(no_for, mask, algorithm=ALGORITHM)
    with pytest.raises(ValueError, match="new series"):
        build_lesion_seg(
            headers, mask, algorithm=ALGORITHM, series_instance_uid=headers[0].SeriesInstanceUID
        )

    seg = build_lesion_seg(headers, mask, algorithm=ALGORITHM)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            build_volume_report(seg, headers, bad, algorithm=ALGORITHM)


# ------------------------------------------------------------------------- SR


def test_sr_round_trip(headers: list[Dataset], tmp_path: Path) -> None:
    volume_ml = 12.3456789
    seg = build_lesion_seg(headers, _lesion_mask(), algorithm=ALGORITHM)
    seg_path = _save(seg, tmp_path / "seg.dcm")
    # the SR is built from the SEG as read back, the way a re-run would see it
    seg_read = _dcmread_strict(seg_path)
    sr = build_volume_report(seg_read, headers, volume_ml, algorithm=ALGORITHM)
    sr_path = _save(sr, tmp_path / "sr.dcm")
    ds = _dcmread_strict(sr_path)

    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.StudyInstanceUID == headers[0].StudyInstanceUID
    assert ds.SeriesInstanceUID not in (seg.SeriesInstanceUID, headers[0].SeriesInstanceUID)
    assert (ds.SeriesNumber, ds.InstanceNumber) == (9902, 1)
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert ds.PatientID == headers[0].PatientID

    assert read_lesion_volume_ml(ds) == pytest.approx(volume_ml, abs=1e-6)

    items = list(_content_items(ds.ContentSequence))
    (num,) = [i for i in items if i.ValueType == "NUM"]
    assert num.ConceptNameCodeSequence[0].CodeValue == "118565006"  # SCT Volume
    unit = num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("mL", "UCUM")

    seg_refs = [
        i.ReferencedSOPSequence[0]
        for i in items
        if i.ValueType == "IMAGE" and "ReferencedSegmentNumber" in i.ReferencedSOPSequence[0]
    ]
    assert [(r.ReferencedSOPInstanceUID, r.ReferencedSegmentNumber) for r in seg_refs] == [
        (seg.SOPInstanceUID, 1)
    ]
    by_name = {
        i.ConceptNameCodeSequence[0].CodeValue: i for i in items if "ConceptNameCodeSequence" in i
    }
    assert by_name["121071"].ConceptCodeSequence[0].CodeValue == "55641003"  # Finding: Infarct
    assert by_name["121052"].ConceptCodeSequence[0].CodeValue == "121053"  # Present
    assert by_name["121005"].ConceptCodeSequence[0].CodeValue == "121007"  # Observer: Device
    assert by_name["121058"].ConceptCodeSequence[0].CodeValue == "24590-2"  # Procedure reported
    # the SR group and the SEG segment carry one tracking identity
    assert by_name["112040"].UID == seg.SegmentSequence[0].TrackingUID

    # via highdicom's TID 1500 parser, as a consumer would
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_volumetric_roi_measurement_groups()
    referenced = group.referenced_segment
    assert referenced is not None
    assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert referenced.referenced_segment_numbers == [1]

    evidence = {
        inst.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert evidence == {h.SOPInstanceUID for h in headers} | {seg.SOPInstanceUID}


@pytest.mark.xfail(
    raises=AttributeError,
    strict=True,
    reason="highdicom 0.28.2: from_segmentation looks for SegmentIdentificationSequence only "
    "per frame, but highdicom writes it in the shared groups for one segment; sr.py builds "
    "the ReferencedSegment itself. When this passes, that workaround can go.",
)
def test_highdicom_referenced_segment_from_segmentation(headers: list[Dataset]) -> None:
    seg = build_lesion_seg(headers, _lesion_mask(), algorithm=ALGORITHM)
    hd.sr.ReferencedSegment.from_segmentation(seg, 1)


def test_read_lesion_volume_ml_rejects_other_objects(
    headers: list[Dataset], tmp_path: Path
) -> None:
    seg = build_lesion_seg(headers, _lesion_mask(), algorithm=ALGORITHM)
    with pytest.raises(ValueError):
        read_lesion_volume_ml(pydicom.dcmread(_save(seg, tmp_path / "seg.dcm")))


# ------------------------------------------------------------ write_results


def test_write_results_writes_both_objects_atomically(
    source_paths: list[Path], tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    uids = {
        "seg_series_instance_uid": stable_uid("job-9", "seg-series"),
        "seg_sop_instance_uid": stable_uid("job-9", "seg"),
        "sr_series_instance_uid": stable_uid("job-9", "sr-series"),
        "sr_sop_instance_uid": stable_uid("job-9", "sr"),
    }

    def run() -> list[ResultObject]:
        return write_results(
            DerivationSources.from_paths(source_paths),
            LesionMask(_lesion_mask(), 4.25),
            None,
            ALGORITHM,
            out_dir,
            DeriveOptions(
                uids=ResultUIDs(
                    seg_series_instance_uid=uids["seg_series_instance_uid"],
                    seg_sop_instance_uid=uids["seg_sop_instance_uid"],
                    sr_series_instance_uid=uids["sr_series_instance_uid"],
                    sr_sop_instance_uid=uids["sr_sop_instance_uid"],
                )
            ),
        )

    results = run()

    assert [r.kind for r in results] == ["SEG", "SR"]
    seg_result, sr_result = results
    assert isinstance(seg_result, ResultObject)
    assert seg_result.path == out_dir / f"SEG_{uids['seg_sop_instance_uid']}.dcm"
    assert sr_result.path == out_dir / f"SR_{uids['sr_sop_instance_uid']}.dcm"
    assert (seg_result.sop_class_uid, sr_result.sop_class_uid) == (
        SegmentationStorage,
        Comprehensive3DSRStorage,
    )
    assert seg_result.series_instance_uid == uids["seg_series_instance_uid"]
    for r in results:
        ds = _dcmread_strict(r.path)
        assert ds.file_meta.MediaStorageSOPInstanceUID == r.sop_instance_uid
        assert ds.SOPInstanceUID == r.sop_instance_uid
    assert read_lesion_volume_ml(pydicom.dcmread(sr_result.path)) == pytest.approx(4.25)

    # a re-run with the same UIDs replaces the files instead of adding any
    again = run()
    assert [r.path for r in again] == [r.path for r in results]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(r.path.name for r in results)


def test_write_results_refuses_mask_volume_disagreement(
    source_paths: list[Path], tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="must agree"):
        write_results(
            DerivationSources.from_paths(source_paths),
            LesionMask(_lesion_mask(), 0.0),
            None,
            ALGORITHM,
            out_dir,
        )
    with pytest.raises(ValueError, match="must agree"):
        write_results(
            DerivationSources.from_paths(source_paths),
            LesionMask(np.zeros((N_SLICES, ROWS, COLUMNS), bool), 1.0),
            None,
            ALGORITHM,
            out_dir,
        )
    assert not out_dir.exists() or not any(out_dir.iterdir())


# -------------------------------------------------- validity and sloppy sources


def _drop(*keywords: str) -> Callable[[list[Dataset]], list[Dataset]]:
    return lambda sources: make_sloppy(sources, keywords)


def _set(keyword: str, value: object) -> Callable[[list[Dataset]], list[Dataset]]:
    def apply(sources: list[Dataset]) -> list[Dataset]:
        for ds in sources:
            setattr(ds, keyword, value)
        return sources

    return apply


def _latin1_name_without_charset(sources: list[Dataset]) -> list[Dataset]:
    for ds in sources:
        del ds.SpecificCharacterSet
        ds.PatientName = "Müller^Jörg"
    return sources


def _procedure_codes(items: list[Dataset]) -> Callable[[list[Dataset]], list[Dataset]]:
    def apply(sources: list[Dataset]) -> list[Dataset]:
        for ds in sources:
            ds.ProcedureCodeSequence = [copy.deepcopy(item) for item in items]
        return sources

    return apply


def _code_without_meaning() -> Dataset:
    item = Dataset()
    item.CodeValue = "MRBRAIN"
    item.CodingSchemeDesignator = "99LOCAL"
    return item


SOURCE_VARIANTS: dict[str, Callable[[list[Dataset]], list[Dataset]]] = {
    "scanner": lambda sources: sources,
    "no patient/study/equipment type 2": make_sloppy,
    "no SliceThickness": _drop("SliceThickness"),
    "empty SliceThickness": _set("SliceThickness", ""),
    "SpacingBetweenSlices contradicts positions": _set("SpacingBetweenSlices", "0.5"),
    "PatientSex MALE": _set("PatientSex", "MALE"),
    "ISO dates": _set("StudyDate", "2024-03-01"),
    "invalid PatientAge": _set("PatientAge", "74"),
    "latin-1 name, no SpecificCharacterSet": _latin1_name_without_charset,
    # Philips Elition/Ingenia: an empty (type 3) ProcedureCodeSequence; dciodvfy's
    # "Bad Sequence number of Items = 0" on SEG and SR until it was dropped
    "empty ProcedureCodeSequence": _procedure_codes([]),
    "ProcedureCodeSequence item without CodeMeaning": _procedure_codes([_code_without_meaning()]),
}


@pytest.mark.parametrize("variant", list(SOURCE_VARIANTS))
def test_outputs_pass_dciodvfy(variant: str, tmp_path: Path) -> None:
    """No dciodvfy Error in SEG, SR or overlay, however careless the source header."""
    with warnings.catch_warnings():  # pydicom rightly warns about the sloppy values we set
        warnings.simplefilter("ignore")
        sources = SOURCE_VARIANTS[variant](make_dwi_series(N_SLICES, ROWS, COLUMNS))
        paths = write_series(sources, tmp_path / "src")
    mask = _lesion_mask()
    volume_ml = float(mask.sum()) * 3.5 * 3.5 * 5.5 / 1000.0
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    results = write_results(
        DerivationSources.from_paths(paths),
        LesionMask(mask, volume_ml),
        _findings_for(headers, mask),
        PROFILED,
        tmp_path / "out",
        DeriveOptions(core_volume_cutoffs_ml=CORE_VOLUME_CUTOFFS_ML, overlay=OverlayOptions()),
    )
    seg, sr, *overlay = results
    # every SEG/SR; of the overlay the first image and those showing the lesion
    checked = [seg, sr, overlay[0], *overlay[8:11]]
    for result in checked:
        _dcmread_strict(result.path)
        assert _dciodvfy_errors(result.path) == [], result.kind
    assert read_lesion_volume_ml(pydicom.dcmread(sr.path)) == pytest.approx(volume_ml)
    assert read_lesion_findings(pydicom.dcmread(sr.path)).lesion_count == 2


def test_sloppy_sources_are_not_modified_and_text_survives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sloppy = make_sloppy(make_dwi_series(N_SLICES, ROWS, COLUMNS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ds in sloppy:
            ds.PatientName = "Müller^Jörg"
            del ds.SliceThickness
        paths = write_series(sloppy, tmp_path / "src")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]

    with caplog.at_level(logging.WARNING, logger="service.derive"):
        seg = build_lesion_seg(headers, _lesion_mask(), algorithm=ALGORITHM)
    assert all("PatientID" not in h and "SliceThickness" not in h for h in headers)
    assert "Müller" not in caplog.text  # repairs are logged by keyword, never by value
    assert "PatientID (absent)" in caplog.text

    ds = _dcmread_strict(_save(seg, tmp_path / "seg.dcm"))
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert str(ds.PatientName) == "Müller^Jörg"
    assert ds.PatientID == "" and ds.StudyDate == ""
    assert (
        float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 5.5
    )


# ------------------------------------------------------------------ algorithm


def test_algorithm_info_validates_and_freezes() -> None:
    params = {"threshold": "0.5"}
    info = AlgorithmInfo("m", "1", parameters=params)
    params["threshold"] = "0.9"
    assert info.parameters == {"threshold": "0.5"}
    assert hash(info) == hash(AlgorithmInfo("m", "1", parameters={"threshold": "0.9"}))
    with pytest.raises(ValueError, match="must not contain"):
        AlgorithmInfo("m", "1", parameters={"a": "1,2"})
    with pytest.raises(ValueError, match="longer than 64"):
        AlgorithmInfo("m" * 65, "1")
    with pytest.raises(ValueError, match="must not be empty"):
        AlgorithmInfo("m", " ")


# ------------------------------------------------------------------- findings
#
# Hand-made masks on a grid where one voxel is exactly 0.1 mL
# (2.0 mm x 2.5 mm x 20 mm), so volumes and classes can be checked by eye.

VOXEL_ML = 0.1


def _geometry(n_slices: int = 6) -> GridGeometry:
    """A sagittal grid: columns run anterior->posterior (+y), rows superior->inferior (-z)."""
    return GridGeometry(
        slice_origins=np.array([[10.0 + 20.0 * k, -30.0, 40.0] for k in range(n_slices)]),
        row_cosine=(0.0, 1.0, 0.0),
        column_cosine=(0.0, 0.0, -1.0),
        pixel_spacing=(2.0, 2.5),
        slice_spacing=20.0,
    )


def _arrays(
    shape: tuple[int, int, int] = (6, 12, 12),
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Probability 0, ADC 800 (normal brain) everywhere, brain = all voxels."""
    return (
        np.zeros(shape, np.float32),
        np.full(shape, 800.0),
        np.ones(shape, bool),
    )


def test_geometry_voxel_volume_and_positions() -> None:
    geometry = _geometry()
    assert geometry.voxel_volume_ml == pytest.approx(VOXEL_ML)
    # slice 2, row 3, column 4: origin + 4 columns * 2.5 mm along +y + 3 rows * 2 mm along -z
    assert geometry.to_patient([[2, 3, 4]])[0] == pytest.approx([50.0, -20.0, 34.0])
    with pytest.raises(ValueError, match="spatial order"):
        GridGeometry(
            slice_origins=np.array([[0.0, 0, 0], [2.0, 0, 0], [1.0, 0, 0]]),
            row_cosine=(0.0, 1.0, 0.0),
            column_cosine=(0.0, 0.0, -1.0),
            pixel_spacing=(1.0, 1.0),
            slice_spacing=1.0,
        )


def test_geometry_from_headers_matches_domain_volume(headers: list[Dataset]) -> None:
    from_headers = grid_geometry(headers)
    assert from_headers.voxel_volume_ml == pytest.approx(3.5 * 3.5 * 5.5 / 1000.0)
    volume = ImageVolume(
        voxels=np.zeros((N_SLICES, ROWS, COLUMNS), np.float32),
        origin=tuple(float(v) for v in headers[0].ImagePositionPatient),  # type: ignore[arg-type]
        row_cosine=(1.0, 0.0, 0.0),
        column_cosine=(0.0, 1.0, 0.0),
        slice_cosine=(0.0, 0.0, 1.0),
        pixel_spacing=(3.5, 3.5),
        slice_spacing=5.5,
    )
    from_volume = GridGeometry.from_volume(volume)
    assert from_volume.voxel_volume_ml == pytest.approx(volume.voxel_volume_ml)
    idx = np.array([[0, 0, 0], [7, 12, 40], [19, 63, 63]])
    assert np.allclose(from_headers.to_patient(idx), from_volume.to_patient(idx))
    # the domain's own affine agrees: (column, row, slice, 1) -> mm
    homogeneous = np.c_[idx[:, [2, 1, 0]], np.ones(3)]
    assert np.allclose((volume.affine() @ homogeneous.T).T[:, :3], from_volume.to_patient(idx))


def test_lesions_are_26_connected_components_numbered_by_volume() -> None:
    mask = np.zeros((6, 12, 12), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner contact only: one lesion with 26-connectivity
    mask[4, 8:10, 8:11] = True  # 6 voxels, the largest
    mask[0, 10, 0] = True  # isolated single voxel, raster-first among the 1-voxel... ties
    mask[5, 0, 11] = True
    probability, adc, brain = _arrays()
    findings = compute_lesion_findings(mask, probability, adc, brain, _geometry())

    assert findings.connectivity == 26
    assert findings.lesion_count == 4
    assert [lesion.voxel_count for lesion in findings.lesions] == [6, 2, 1, 1]
    assert [lesion.number for lesion in findings.lesions] == [1, 2, 3, 4]
    # equal sizes: the lesion whose first voxel comes first in (slice, row, column) order first
    assert [lesion.first_slice for lesion in findings.lesions[2:]] == [0, 5]
    assert findings.voxel_count == 10
    assert findings.total_volume_ml == pytest.approx(10 * VOXEL_ML)
    assert sum(lesion.volume_ml for lesion in findings.lesions) == pytest.approx(1.0)


def test_per_lesion_numbers_by_hand() -> None:
    geometry = _geometry()
    mask = np.zeros((6, 12, 12), bool)
    mask[2:4, 3:6, 4:7] = True  # 2 x 3 x 3 = 18 voxels = 1.8 mL
    probability, adc, brain = _arrays()
    probability[mask] = 0.9
    adc[2, 3:6, 4:7] = 500.0
    adc[3, 3:6, 4:7] = 700.0
    adc[3, 5, 6] = 0.0  # a fit failure inside the lesion: ignored, not "restricted"
    findings = compute_lesion_findings(mask, probability, adc, brain, geometry)

    (lesion,) = findings.lesions
    assert lesion.voxel_count == 18
    assert lesion.volume_ml == pytest.approx(1.8)
    assert lesion.volume_class is VolumeClass.MEDIUM
    assert (lesion.first_slice, lesion.last_slice) == (2, 3)
    # mean index (2.5, 4, 5): x = 10 + 20 * 2.5, y = -30 + 5 * 2.5, z = 40 - 4 * 2
    assert lesion.centroid_mm == pytest.approx((60.0, -17.5, 32.0))
    assert lesion.mean_adc == pytest.approx((9 * 500.0 + 8 * 700.0) / 17)
    assert lesion.mean_probability == pytest.approx(0.9)
    assert findings.mean_adc == pytest.approx(lesion.mean_adc)
    assert findings.mean_probability == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("volume_ml", "expected"),
    [(0.1, "small"), (1.69, "small"), (1.7, "medium"), (14.0, "medium"), (14.01, "large")],
)
def test_volume_class_cut_offs(volume_ml: float, expected: str) -> None:
    assert VolumeClass.from_volume_ml(volume_ml) == expected


def test_adc_core_volume_counts_brain_voxels_below_620_only() -> None:
    mask = np.zeros((6, 12, 12), bool)
    probability, adc, brain = _arrays()
    brain[:, :, 10:] = False
    adc[1, 0, 0:5] = 619.9  # 5 core voxels
    adc[1, 1, 0:3] = 620.0  # at the threshold: not below it
    adc[2, 0, 10:12] = 100.0  # outside the brain
    adc[3, 0, 0] = 0.0  # fit failure
    adc[3, 0, 1] = np.nan
    adc[3, 0, 2] = -5.0
    findings = compute_lesion_findings(mask, probability, adc, brain, _geometry())
    assert findings.adc_core_volume_ml == pytest.approx(5 * VOXEL_ML)
    assert findings.adc_core_threshold == 620.0
    comparisons = findings.core_volume_comparisons()
    assert [(c.cutoff_ml, c.below) for c in comparisons] == [
        (21.0, True),
        (31.0, True),
        (51.0, True),
        (70.0, True),
    ]
    # the core does not depend on the model's mask
    mask[5, 5, 5] = True
    probability[5, 5, 5] = 0.8
    again = compute_lesion_findings(mask, probability, adc, brain, _geometry())
    assert again.adc_core_volume_ml == findings.adc_core_volume_ml


def _core_geometry(n_slices: int = 10) -> GridGeometry:
    """An axial grid of 1 x 1 x 5 mm voxels (0.005 mL), like a thin-pixel DWI."""
    return GridGeometry(
        slice_origins=np.array([[0.0, 0.0, 5.0 * k] for k in range(n_slices)]),
        row_cosine=(1.0, 0.0, 0.0),
        column_cosine=(0.0, 1.0, 0.0),
        pixel_spacing=(1.0, 1.0),
        slice_spacing=5.0,
    )


def _grown(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``mask`` grown by one voxel in every direction (26-neighbourhood)."""
    grown: npt.NDArray[np.bool_] = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool))
    return grown


def _scattered(shape: tuple[int, int, int], keep_away: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Single voxels 2 slices and 3 rows/columns apart: none touches another, even at a
    corner, nor ``keep_away``."""
    voxels = np.zeros(shape, bool)
    voxels[::2, ::3, ::3] = True
    voxels &= ~_grown(keep_away)
    return voxels


def test_adc_core_is_a_2_ml_block_not_the_noise_voxels_around_it() -> None:
    geometry = _core_geometry()
    shape = (10, 64, 64)
    mask = np.zeros(shape, bool)
    probability = np.zeros(shape, np.float32)
    adc = np.random.default_rng(5).normal(800.0, 40.0, shape).clip(700.0, 900.0)
    brain = np.zeros(shape, bool)
    brain[:, 4:60, 4:60] = True
    adc[~brain] = 0.0  # zero-filled background around the head
    block = np.zeros(shape, bool)
    block[2:6, 20:30, 20:30] = True  # 4 x 10 x 10 = 400 voxels x 0.005 mL = 2.0 mL
    adc[block] = 450.0
    noise = _scattered(shape, block) & brain
    adc[noise] = 400.0  # each its own one-voxel "cluster"
    noise_ml = int(noise.sum()) * geometry.voxel_volume_ml
    assert noise_ml > 1.0  # what the noise added before clusters were required

    findings = compute_lesion_findings(mask, probability, adc, brain, geometry)
    assert findings.core_min_cluster_ml == 0.3
    assert findings.adc_core_volume_ml == pytest.approx(2.0)
    unfiltered = compute_lesion_findings(
        mask, probability, adc, brain, geometry, core_min_cluster_ml=0.0
    )
    assert unfiltered.adc_core_volume_ml == pytest.approx(2.0 + noise_ml)


def test_adc_core_cluster_size_and_6_connectivity() -> None:
    geometry = _core_geometry()
    shape = (10, 64, 64)
    mask = np.zeros(shape, bool)
    probability = np.zeros(shape, np.float32)
    brain = np.ones(shape, bool)
    adc = np.full(shape, 800.0)
    adc[1, 5:9, 5:20] = 500.0  # 4 x 15 = 60 voxels = 0.3 mL: exactly the minimum, counts
    adc[3:5, 5:9, 30:40] = 500.0  # 2 x 4 x 10 = 80 voxels = 0.4 mL: counts
    adc[6, 5:10, 5:15] = 500.0  # 50 voxels = 0.25 mL: too small
    # 80 voxels (0.4 mL) touching only at edges and corners: 80 one-voxel clusters
    # (with 26-connectivity they would be one 0.4 mL cluster and count)
    for i in range(40):
        adc[8, 20 + i, 10 + i] = 300.0  # diagonal in-plane: edge contact only
        adc[9, 20 + i, 11 + i] = 300.0  # next slice, shifted: edge contact with the one above
    findings = compute_lesion_findings(mask, probability, adc, brain, geometry)
    assert findings.adc_core_volume_ml == pytest.approx(0.3 + 0.4)
    assert compute_lesion_findings(
        mask, probability, adc, brain, geometry, core_min_cluster_ml=0.0
    ).adc_core_volume_ml == pytest.approx(0.3 + 0.4 + 0.25 + 0.4)
    with pytest.raises(ValueError, match="core_min_cluster_ml"):
        compute_lesion_findings(mask, probability, adc, brain, geometry, core_min_cluster_ml=-1)


def test_adc_core_is_restricted_to_the_brain_mask() -> None:
    geometry = _core_geometry()
    shape = (10, 64, 64)
    mask = np.zeros(shape, bool)
    probability = np.zeros(shape, np.float32)
    adc = np.full(shape, 800.0)
    brain = np.zeros(shape, bool)
    brain[:, 8:56, 8:56] = True
    adc[:, :4, :] = 0.0  # zero-filled background
    adc[:, 4:8, :] = 300.0  # low "ADC" in a 4-voxel rim of skull/scalp: 10 x 4 x 64 = 12.8 mL
    adc[:, 30:34, 30:34] = 3000.0  # ventricle CSF: inside the mask, far above the threshold
    adc[3:5, 20:30, 20:30] = 500.0  # 200 voxels = 1.0 mL of real core
    findings = compute_lesion_findings(mask, probability, adc, brain, geometry)
    assert findings.adc_core_volume_ml == pytest.approx(1.0)
    # the mask is what keeps the rim out: a mask that leaks into it counts it
    leaky = brain.copy()
    leaky[:, 4:8, :] = True
    assert compute_lesion_findings(
        mask, probability, adc, leaky, geometry
    ).adc_core_volume_ml == pytest.approx(1.0 + 12.8)


@pytest.mark.parametrize(
    ("core_ml", "expected_below"),
    [
        (2.0, {21.0: True, 31.0: True, 51.0: True, 70.0: True}),
        (25.0, {21.0: False, 31.0: True, 51.0: True, 70.0: True}),
        (60.0, {21.0: False, 31.0: False, 51.0: False, 70.0: True}),
    ],
)
def test_core_volume_flags_in_the_sr_follow_the_core_not_the_noise(
    core_ml: float, expected_below: dict[float, bool], headers: list[Dataset], tmp_path: Path
) -> None:
    """A core block plus > 21 mL of scattered noise voxels: the SR's flags follow the block."""
    shape = (N_SLICES, ROWS, COLUMNS)
    geometry = grid_geometry(headers)  # 3.5 x 3.5 x 5.5 mm: 0.067 mL voxels
    mask = np.zeros(shape, bool)
    probability = np.zeros(shape, np.float32)
    adc = np.full(shape, 800.0)
    brain = np.ones(shape, bool)
    block = np.zeros(shape, bool)
    n_core = round(core_ml / geometry.voxel_volume_ml)
    block.reshape(-1)[:n_core] = True  # raster order from the first voxel: one cluster
    adc[block] = 450.0
    noise = _scattered(shape, block)
    adc[noise] = 400.0
    noise_ml = int(noise.sum()) * geometry.voxel_volume_ml
    assert noise_ml > 21.0  # enough to flip the 21 mL comparison if it counted
    core = n_core * geometry.voxel_volume_ml
    assert core == pytest.approx(core_ml, abs=0.05)

    findings = compute_lesion_findings(mask, probability, adc, brain, geometry)
    assert findings.adc_core_volume_ml == pytest.approx(core)
    seg = build_lesion_seg(headers, mask, algorithm=PROFILED)
    sr = build_volume_report(
        seg, headers, 0.0, algorithm=PROFILED, findings=findings,
        core_volume_cutoffs_ml=CORE_VOLUME_CUTOFFS_ML,
    )
    got = read_lesion_findings(_dcmread_strict(_save(sr, tmp_path / "sr.dcm")))
    assert got.adc_core_volume_ml == pytest.approx(core)
    assert got.core_volume_below == expected_below
    # without the cluster rule the noise would have moved the flags
    unfiltered = compute_lesion_findings(
        mask, probability, adc, brain, geometry, core_min_cluster_ml=0.0
    )
    assert unfiltered.adc_core_volume_ml == pytest.approx(core + noise_ml)
    assert {c.cutoff_ml: c.below for c in unfiltered.core_volume_comparisons()}[21.0] is False


def test_core_volume_comparison_is_strictly_below() -> None:
    mask = np.zeros((6, 12, 12), bool)
    probability, adc, brain = _arrays()
    adc.reshape(-1)[:210] = 300.0  # 210 voxels = 21.0 mL
    findings = compute_lesion_findings(mask, probability, adc, brain, _geometry())
    assert findings.adc_core_volume_ml == pytest.approx(21.0)
    below = {c.cutoff_ml: c.below for c in findings.core_volume_comparisons((70, 21, 31))}
    assert below == {21.0: False, 31.0: True, 70.0: True}


def test_borderline_fraction_by_hand() -> None:
    mask = np.zeros((6, 12, 12), bool)
    probability, adc, brain = _arrays()
    flat = probability.reshape(-1)
    flat[:6] = 0.9  # confident
    flat[6:9] = [0.3, 0.5, 0.7]  # borderline, both ends included
    flat[9:12] = [0.29, 0.1, 0.2]  # not candidates
    mask.reshape(-1)[:7] = True
    findings = compute_lesion_findings(mask, probability, adc, brain, _geometry())
    assert findings.borderline_fraction == pytest.approx(3 / 9)
    assert findings.mean_probability == pytest.approx((6 * 0.9 + 0.3) / 7)


def test_zero_lesion_findings() -> None:
    probability, adc, brain = _arrays()
    probability[0, 0, 0] = 0.2
    findings = compute_lesion_findings(
        np.zeros((6, 12, 12), bool), probability, adc, brain, _geometry()
    )
    assert findings.lesion_count == 0 and findings.lesions == ()
    assert findings.total_volume_ml == 0.0
    assert findings.mean_adc is None and findings.mean_probability is None
    assert findings.borderline_fraction == 0.0
    assert findings.adc_core_volume_ml == 0.0


def test_findings_refuse_wrong_inputs() -> None:
    mask = np.zeros((6, 12, 12), bool)
    probability, adc, brain = _arrays()
    with pytest.raises(ValueError, match="1e-6 mm2/s"):
        compute_lesion_findings(mask, probability, adc / 1e6, brain, _geometry())  # mm2/s
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        compute_lesion_findings(mask, probability + 2.0, adc, brain, _geometry())
    with pytest.raises(ValueError, match="shape"):
        compute_lesion_findings(mask, probability[:5], adc, brain, _geometry())
    with pytest.raises(ValueError, match="geometry has 5 slices"):
        compute_lesion_findings(mask, probability, adc, brain, _geometry(5))
    with pytest.raises(ValueError, match="boolean"):
        compute_lesion_findings(mask.astype(float), probability, adc, brain, _geometry())


# ------------------------------------------------------------- SR with findings


def _multi_lesion_mask() -> npt.NDArray[np.bool_]:
    """A large (16.2 mL), a medium (2.0 mL) and a small (0.07 mL) lesion."""
    mask = np.zeros((N_SLICES, ROWS, COLUMNS), dtype=bool)
    mask[8:11, 20:30, 25:33] = True  # 240 voxels
    mask[14, 40:46, 40:45] = True  # 30 voxels
    mask[4, 10, 50] = True  # 1 voxel
    return mask


def _study_arrays(
    mask: npt.NDArray[np.bool_],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    probability = np.where(mask, 0.95, 0.02).astype(np.float32)
    adc = np.full(mask.shape, 780.0)
    adc[mask] = 480.0
    if mask.shape[0] == N_SLICES:
        probability[8, 19, 25:33] = 0.45  # a borderline rim outside the mask
        adc[14][mask[14]] = 650.0  # the medium lesion is not below 620
    brain = np.zeros(mask.shape, bool)
    brain[:, 8:56, 8:56] = True
    return probability, adc, brain


def _findings_for(
    headers: Sequence[Dataset], mask: npt.NDArray[np.bool_], quality: str = "scanner ADC; no issues"
) -> LesionFindings:
    probability, adc, brain = _study_arrays(mask)
    return compute_lesion_findings(
        mask, probability, adc, brain, grid_geometry(headers), input_quality=quality
    )


PROFILED = AlgorithmInfo(
    name="strokeseg-unet",
    version="1.2.0",
    parameters={"threshold": "0.5"},
    preprocessing_profile="dwi-median-adc-fixed-v1",
)


def test_sr_with_findings_round_trip(headers: list[Dataset], tmp_path: Path) -> None:
    mask = _multi_lesion_mask()
    findings = _findings_for(headers, mask)
    seg = build_lesion_seg(headers, mask, algorithm=PROFILED)
    sr = build_volume_report(
        seg,
        headers,
        findings.total_volume_ml,
        algorithm=PROFILED,
        findings=findings,
        core_volume_cutoffs_ml=CORE_VOLUME_CUTOFFS_ML,
    )
    path = _save(sr, tmp_path / "sr.dcm")
    ds = _dcmread_strict(path)
    assert _dciodvfy_errors(path) == []

    voxel_ml = 3.5 * 3.5 * 5.5 / 1000.0
    assert read_lesion_volume_ml(ds) == pytest.approx(271 * voxel_ml)
    got = read_lesion_findings(ds)
    assert got.lesion_present
    assert got.lesion_count == 3
    assert got.lesion_count_method == "3-D connected components, 26-connectivity"
    assert got.mean_adc == pytest.approx((240 * 480.0 + 30 * 650.0 + 480.0) / 271)
    assert got.mean_probability == pytest.approx(0.95, abs=1e-6)
    assert got.borderline_fraction == pytest.approx(8 / (271 + 8))
    assert got.input_quality == "scanner ADC; no issues"
    # the large lesion; the one-voxel small lesion (0.07 mL) is below the 0.3 mL cluster minimum
    assert got.adc_core_volume_ml == pytest.approx(240 * voxel_ml)
    assert got.core_volume_below == {21.0: True, 31.0: True, 51.0: True, 70.0: True}
    assert any("not treatment advice" in c and "DEFUSE-3" in c for c in got.comments)
    assert any(
        c.startswith("Volume of ADC below 620 um2/s inside the brain mask")
        and "clusters of at least 0.3 mL (6-connected voxels)" in c
        for c in got.comments
    )
    assert (got.algorithm_name, got.algorithm_version) == ("strokeseg-unet", "1.2.0")
    assert got.algorithm_parameters == (
        "threshold=0.5",
        "preprocessing_profile=dwi-median-adc-fixed-v1",
    )
    assert got.private_schemes == ("99STROKESEG",)

    large, medium, small = got.lesions
    assert [lesion.identifier for lesion in got.lesions] == [
        "Lesion 1 of 3",
        "Lesion 2 of 3",
        "Lesion 3 of 3",
    ]
    assert [lesion.size for lesion in got.lesions] == ["large", "medium", "small"]
    assert large.volume_ml == pytest.approx(240 * voxel_ml)
    assert medium.volume_ml == pytest.approx(30 * voxel_ml)
    assert small.volume_ml == pytest.approx(voxel_ml)
    assert (large.slice_indices, large.instance_numbers) == ((8, 10), (9, 11))
    assert large.source_sop_instance_uids == tuple(h.SOPInstanceUID for h in headers[8:11])
    assert medium.mean_adc == pytest.approx(650.0)
    # centroid by hand: factory origin -110.25 mm in-plane, z = -52.25 + 5.5 * slice
    assert large.centroid_mm == pytest.approx(
        (-110.25 + 28.5 * 3.5, -110.25 + 24.5 * 3.5, -52.25 + 9 * 5.5)
    )
    assert small.centroid_mm == pytest.approx(
        (-110.25 + 50 * 3.5, -110.25 + 10 * 3.5, -52.25 + 4 * 5.5)
    )
    for reported, computed in zip(got.lesions, findings.lesions, strict=True):
        assert reported.centroid_mm == pytest.approx(computed.centroid_mm, abs=1e-3)

    # the raw encoding a non-highdicom consumer would see
    items = list(_content_items(ds.ContentSequence))
    units = {
        i.ConceptNameCodeSequence[0].CodeValue: i.MeasuredValueSequence[0]
        .MeasurementUnitsCodeSequence[0]
        .CodeValue
        for i in items
        if i.ValueType == "NUM"
    }
    assert units["113041"] == "um2/s"  # ADC in UCUM um2/s (= 1e-6 mm2/s)
    assert units["246206008"] == "1"  # SCT Number of lesions
    assert units["118565006"] == "mL"
    points = [i for i in items if i.ValueType == "SCOORD3D"]
    assert len(points) == 3 and {p.GraphicType for p in points} == {"POINT"}
    assert {p.ReferencedFrameOfReferenceUID for p in points} == {headers[0].FrameOfReferenceUID}
    purposes = [
        i.ConceptCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "130400"
    ]
    assert purposes == ["128138"] * 3  # Center of Mass
    sizes = [
        i.ConceptCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "112025"
    ]
    assert sizes == ["255509001", "255508009", "255507004"]  # SCT Large, Medium, Small
    (scheme,) = ds.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99STROKESEG"
    private = {
        (c.CodingSchemeDesignator, c.CodeValue)
        for i in items
        for c in (*i.get("ConceptNameCodeSequence", []), *i.get("ConceptCodeSequence", []))
        if c.CodingSchemeDesignator.startswith("99")
    }
    assert {v for _, v in private} == {
        "CC3D26",
        "MEANPROB",
        "BORDER0.3-0.7",
        "SLICERANGE",
        "ADCLT620",
        "CORELT21",
        "CORELT31",
        "CORELT51",
        "CORELT70",
    }


def test_sr_with_findings_and_no_lesion(headers: list[Dataset], tmp_path: Path) -> None:
    mask = np.zeros((N_SLICES, ROWS, COLUMNS), dtype=bool)
    findings = _findings_for(headers, mask)
    seg = build_lesion_seg(headers, mask, algorithm=PROFILED)
    sr = build_volume_report(
        seg, headers, 0.0, algorithm=PROFILED, findings=findings, core_volume_cutoffs_ml=(21,)
    )
    path = _save(sr, tmp_path / "sr.dcm")
    assert _dciodvfy_errors(path) == []
    got = read_lesion_findings(_dcmread_strict(path))
    assert not got.lesion_present
    assert got.lesion_volume_ml == 0.0 and got.lesion_count == 0 and got.lesions == ()
    assert got.mean_adc is None and got.mean_probability is None
    assert got.adc_core_volume_ml == 0.0 and got.core_volume_below == {21.0: True}


def test_sr_without_findings_reads_back_without_them(headers: list[Dataset]) -> None:
    seg = build_lesion_seg(headers, _lesion_mask(), algorithm=ALGORITHM)
    sr = build_volume_report(seg, headers, 2.5, algorithm=ALGORITHM)
    got = read_lesion_findings(sr)
    assert got.lesion_volume_ml == pytest.approx(2.5)
    assert got.lesion_count is None and got.lesions == () and got.adc_core_volume_ml is None
    assert "CodingSchemeIdentificationSequence" not in sr


def test_sr_itemises_at_most_max_lesions(headers: list[Dataset]) -> None:
    mask = np.zeros((N_SLICES, ROWS, COLUMNS), dtype=bool)
    mask[5, 10:20:2, 10:20:2] = True  # 25 single-voxel lesions
    mask[6, 30:34, 30:34] = True
    findings = _findings_for(headers, mask)
    seg = build_lesion_seg(headers, mask, algorithm=ALGORITHM)
    sr = build_volume_report(
        seg,
        headers,
        findings.total_volume_ml,
        algorithm=ALGORITHM,
        findings=findings,
        max_itemised_lesions=2,
    )
    got = read_lesion_findings(sr)
    assert got.lesion_count == 26
    assert [lesion.identifier for lesion in got.lesions] == ["Lesion 1 of 26", "Lesion 2 of 26"]
    assert any(c.startswith("24 further lesions") for c in got.comments)


def test_sr_refuses_findings_of_another_mask(headers: list[Dataset]) -> None:
    mask = _multi_lesion_mask()
    findings = _findings_for(headers, mask)
    seg = build_lesion_seg(headers, mask, algorithm=ALGORITHM)
    with pytest.raises(ValueError, match="same mask"):
        build_volume_report(seg, headers, 1.0, algorithm=ALGORITHM, findings=findings)
    with pytest.raises(ValueError, match="need findings"):
        build_volume_report(seg, headers, 1.0, algorithm=ALGORITHM, core_volume_cutoffs_ml=(21,))
    other = _findings_for(headers[:10], mask[:10])
    with pytest.raises(ValueError, match="10 slices"):
        build_volume_report(
            seg, headers, other.total_volume_ml, algorithm=ALGORITHM, findings=other
        )


def test_write_results_with_findings_and_overlay(
    source_paths: list[Path], headers: list[Dataset], tmp_path: Path
) -> None:
    mask = _multi_lesion_mask()
    findings = _findings_for(headers, mask)
    out_dir = tmp_path / "out"
    uids = {
        "seg_series_instance_uid": stable_uid("job-7", "seg-series"),
        "seg_sop_instance_uid": stable_uid("job-7", "seg"),
        "sr_series_instance_uid": stable_uid("job-7", "sr-series"),
        "sr_sop_instance_uid": stable_uid("job-7", "sr"),
        "overlay_series_instance_uid": stable_uid("job-7", "overlay-series"),
    }

    def run() -> list[ResultObject]:
        return write_results(
            DerivationSources.from_paths(source_paths),
            LesionMask(mask, findings.total_volume_ml),
            findings,
            PROFILED,
            out_dir,
            DeriveOptions(
                uids=ResultUIDs(**uids),
                core_volume_cutoffs_ml=CORE_VOLUME_CUTOFFS_ML,
                overlay=OverlayOptions(label="TEST SITE - RESEARCH ONLY"),
            ),
        )

    results = run()
    assert [r.kind for r in results] == ["SEG", "SR"] + ["OVERLAY"] * N_SLICES
    overlay = results[2:]
    assert {r.series_instance_uid for r in overlay} == {uids["overlay_series_instance_uid"]}
    assert all(r.path.name == f"OVERLAY_{r.sop_instance_uid}.dcm" for r in overlay)
    assert read_lesion_findings(pydicom.dcmread(results[1].path)).lesion_count == 3
    first = pydicom.dcmread(overlay[0].path)
    assert first.ImageComments.startswith("TEST SITE - RESEARCH ONLY")
    again = run()
    assert [r.path for r in again] == [r.path for r in results]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(r.path.name for r in results)


def test_write_results_refuses_findings_of_another_mask(
    source_paths: list[Path], headers: list[Dataset], tmp_path: Path
) -> None:
    findings = _findings_for(headers, _multi_lesion_mask())
    with pytest.raises(ValueError, match="same mask"):
        write_results(
            DerivationSources.from_paths(source_paths),
            LesionMask(_lesion_mask(), 1.0),
            findings,
            ALGORITHM,
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_algorithm_info_preprocessing_profile(headers: list[Dataset]) -> None:
    assert (
        PROFILED.parameters_text() == "threshold=0.5,preprocessing_profile=dwi-median-adc-fixed-v1"
    )
    seg = build_lesion_seg(headers, _lesion_mask(), algorithm=PROFILED)
    (algo,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert algo.AlgorithmParameters == PROFILED.parameters_text()
    with pytest.raises(ValueError, match="as preprocessing_profile"):
        AlgorithmInfo("m", "1", parameters={"preprocessing_profile": "x"})
    with pytest.raises(ValueError, match="must not contain"):
        AlgorithmInfo("m", "1", preprocessing_profile="a,b")


# ------------------------------------------- domain of validity and set-aside components

_OUTSIDE = DomainOfValidity(
    reasons=("b=3000 s/mm2 outside the validated 900-1600", "SNR 4.2 < 6"),
    notes=("ADC core threshold 545 (620 at b=1000, scaled x0.880 for b=3000)",),
    b_value=3000.0,
    adc_core_threshold=545.0,
    measures=(("slice_spacing_mm", 5.5), ("snr", 4.2)),
)
_MIMICS = (
    DiffusionMimic(
        volume_ml=1.35,
        mean_adc=1150.0,
        relative_adc=1.42,
        centroid_mm=(-40.0, 12.5, 3.25),
        first_slice=12,
        last_slice=13,
        reason="DWI hyperintensity without restricted diffusion (mean ADC 1150 >= 750, rADC 1.42 >= 0.85)",
    ),
    DiffusionMimic(
        volume_ml=0.4,
        mean_adc=None,
        relative_adc=None,
        centroid_mm=(90.0, -100.0, -30.0),
        first_slice=3,
        last_slice=3,
        reason="outside the brain",
    ),
)


def _assessed_findings(
    headers: Sequence[Dataset], validity: DomainOfValidity, mimics: Sequence[DiffusionMimic] = ()
) -> LesionFindings:
    mask = _multi_lesion_mask()
    probability, adc, brain = _study_arrays(mask)
    return compute_lesion_findings(
        mask, probability, adc, brain, grid_geometry(headers), mimics=mimics, validity=validity
    )


def _measurement_group_identifiers(ds: Dataset) -> list[str]:
    """Tracking Identifiers of the Imaging Measurements groups, in document order."""
    (container,) = [
        item
        for item in ds.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    return [
        next(
            str(child.TextValue)
            for child in group.ContentSequence
            if child.ConceptNameCodeSequence[0].CodeValue == "112039"  # Tracking Identifier
        )
        for group in container.ContentSequence
    ]


def test_sr_states_outside_validated_range_first_and_lists_mimics(
    headers: list[Dataset], tmp_path: Path
) -> None:
    findings = _assessed_findings(headers, _OUTSIDE, _MIMICS)
    seg = build_lesion_seg(headers, _multi_lesion_mask(), algorithm=PROFILED)
    sr = build_volume_report(
        seg, headers, findings.total_volume_ml, algorithm=PROFILED, findings=findings
    )
    path = _save(sr, tmp_path / "sr.dcm")
    assert _dciodvfy_errors(path) == []
    ds = _dcmread_strict(path)

    # the statement comes before every measurement it qualifies
    identifiers = _measurement_group_identifiers(ds)
    assert identifiers[0] == "Domain of validity"
    assert identifiers[1] == "Acute ischemic lesion"
    assert identifiers[-1].startswith("ADC core")
    assert identifiers[2:-1] == [
        "Lesion 1 of 3",
        "Lesion 2 of 3",
        "Lesion 3 of 3",
        "DWI hyperintensity without restricted diffusion 1 of 2",
        "DWI hyperintensity without restricted diffusion 2 of 2",
    ]

    got = read_lesion_findings(ds)
    assert got.validity_status == "outside"
    assert got.validity_summary == (
        "OUTSIDE VALIDATED RANGE: b=3000 s/mm2 outside the validated 900-1600; SNR 4.2 < 6"
    )
    assert got.validity_reasons == _OUTSIDE.reasons
    assert got.validity_notes == _OUTSIDE.notes
    assert got.validity_measures == {"slice_spacing_mm": 5.5, "snr": 4.2}

    # mimics: listed, not counted
    voxel_ml = 3.5 * 3.5 * 5.5 / 1000.0
    assert got.lesion_volume_ml == pytest.approx(271 * voxel_ml)
    assert got.lesion_count == 3 and len(got.lesions) == 3
    first, second = got.mimics
    assert first.volume_ml == pytest.approx(1.35)
    assert first.mean_adc == pytest.approx(1150.0)
    assert first.relative_adc == pytest.approx(1.42)
    assert first.centroid_mm == pytest.approx((-40.0, 12.5, 3.25))
    assert first.slice_indices == (12, 13) and first.instance_numbers == (13, 14)
    assert first.source_sop_instance_uids == tuple(h.SOPInstanceUID for h in headers[12:14])
    assert first.reason == _MIMICS[0].reason
    assert (second.mean_adc, second.relative_adc, second.reason) == (None, None, "outside the brain")
    assert any(
        c.startswith("2 DWI-bright components without restricted diffusion")
        and "1.75 mL in all" in c
        and "not counted in the lesion volume or the lesion count" in c
        for c in got.comments
    )

    # the raw encoding: Yes/No answer and private finding type
    items = list(_content_items(ds.ContentSequence))
    answers = [
        i.ConceptCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "WITHINRANGE"
    ]
    assert answers == ["373067005"]  # SCT No
    finding_types = [
        (c.CodingSchemeDesignator, c.CodeValue)
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"
        for c in i.ConceptCodeSequence
    ]
    assert finding_types.count(("99STROKESEG", "DWIMIMIC")) == 2
    assert finding_types.count(("SCT", "55641003")) == 1 + 3 + 1  # lesion, lesions, core
    units = {
        i.ConceptNameCodeSequence[0].CodeValue: i.MeasuredValueSequence[0]
        .MeasurementUnitsCodeSequence[0]
        .CodeValue
        for i in items
        if i.ValueType == "NUM"
    }
    assert units["RADC"] == "1"


def test_sr_within_validated_range_says_so_with_its_notes(
    headers: list[Dataset], tmp_path: Path
) -> None:
    within = DomainOfValidity(
        notes=("b=1500 trace harmonised to a b=1000-equivalent (S0 exp(-1000 ADC))",),
        b_value=1500.0,
    )
    findings = _assessed_findings(headers, within)
    seg = build_lesion_seg(headers, _multi_lesion_mask(), algorithm=PROFILED)
    sr = build_volume_report(
        seg, headers, findings.total_volume_ml, algorithm=PROFILED, findings=findings
    )
    path = _save(sr, tmp_path / "sr.dcm")
    assert _dciodvfy_errors(path) == []
    got = read_lesion_findings(_dcmread_strict(path))
    assert got.validity_status == "within"
    assert got.validity_summary == "within the model's validated range"
    assert got.validity_reasons == () and got.validity_notes == within.notes
    assert got.mimics == ()
    assert not any("without restricted diffusion" in c for c in got.comments)


def test_sr_without_assessment_has_no_validity_statement(headers: list[Dataset]) -> None:
    findings = _findings_for(headers, _multi_lesion_mask())
    seg = build_lesion_seg(headers, _multi_lesion_mask(), algorithm=PROFILED)
    sr = build_volume_report(
        seg, headers, findings.total_volume_ml, algorithm=PROFILED, findings=findings
    )
    got = read_lesion_findings(sr)
    assert got.validity_status is None and got.validity_reasons == () and got.mimics == ()
    assert _measurement_group_identifiers(sr)[0] == "Acute ischemic lesion"


def test_sr_refuses_a_mimic_beyond_the_sources(headers: list[Dataset]) -> None:
    beyond = DiffusionMimic(1.0, 1000.0, 1.3, (0.0, 0.0, 0.0), N_SLICES - 1, N_SLICES, "test")
    findings = _assessed_findings(headers, DomainOfValidity(), (beyond,))
    seg = build_lesion_seg(headers, _multi_lesion_mask(), algorithm=PROFILED)
    with pytest.raises(ValueError, match="beyond the source images"):
        build_volume_report(
            seg, headers, findings.total_volume_ml, algorithm=PROFILED, findings=findings
        )
