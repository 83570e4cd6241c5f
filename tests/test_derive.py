"""Round trips of the derived DICOM objects (SEG, TID 1500 SR) through files.

Every object is written, read back with pydicom/highdicom as a receiver
would, and (where dicom3tools is installed) checked with ``dciodvfy -new``.
Sources are synthetic classic MR DWI images from :mod:`tests.dicom_factory`,
complete like a scanner's, and deliberately sloppy variants of them.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from service.derive import (
    AlgorithmInfo,
    build_lesion_seg,
    build_volume_report,
    read_lesion_volume_ml,
    stable_uid,
    write_results,
)
from service.domain import ResultObject
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
            source_paths,
            _lesion_mask(),
            4.25,
            ALGORITHM,
            out_dir,
            seg_series_instance_uid=uids["seg_series_instance_uid"],
            seg_sop_instance_uid=uids["seg_sop_instance_uid"],
            sr_series_instance_uid=uids["sr_series_instance_uid"],
            sr_sop_instance_uid=uids["sr_sop_instance_uid"],
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
        write_results(source_paths, _lesion_mask(), 0.0, ALGORITHM, out_dir)
    with pytest.raises(ValueError, match="must agree"):
        write_results(
            source_paths, np.zeros((N_SLICES, ROWS, COLUMNS), bool), 1.0, ALGORITHM, out_dir
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
}


@pytest.mark.parametrize("variant", list(SOURCE_VARIANTS))
def test_outputs_pass_dciodvfy(variant: str, tmp_path: Path) -> None:
    """No dciodvfy Error in SEG or SR, however careless the source header."""
    with warnings.catch_warnings():  # pydicom rightly warns about the sloppy values we set
        warnings.simplefilter("ignore")
        sources = SOURCE_VARIANTS[variant](make_dwi_series(N_SLICES, ROWS, COLUMNS))
        paths = write_series(sources, tmp_path / "src")
    mask = _lesion_mask()
    volume_ml = float(mask.sum()) * 3.5 * 3.5 * 5.5 / 1000.0
    results = write_results(paths, mask, volume_ml, ALGORITHM, tmp_path / "out")
    for result in results:
        _dcmread_strict(result.path)
        assert _dciodvfy_errors(result.path) == [], result.kind
    assert read_lesion_volume_ml(pydicom.dcmread(results[1].path)) == pytest.approx(volume_ml)


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
