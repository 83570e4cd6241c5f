"""The overlay series: RGB Secondary Capture images with the lesion outlined.

What a receiver gets is checked through files: the images are written,
read back strictly, validated with ``dciodvfy -new``, and their pixels are
compared with what the module docstring promises -- outline colour exactly on
the mask boundary, the windowed DWI grey value everywhere else in the image,
and the summary text (read back with a tiny OCR over our own font) in the
banner below.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from service.derive import (
    DEFAULT_OVERLAY_LABEL,
    AlgorithmInfo,
    build_overlay_series,
    compute_lesion_findings,
    grid_geometry,
    stable_uid,
)
from service.derive.font import CELL_HEIGHT, CELL_WIDTH, GLYPHS, draw_text, glyph, wrap
from service.derive.overlay import (
    DEFAULT_OUTLINE_RGB,
    OverlayLayout,
    auto_window,
    lesion_outline,
    overlay_layout,
    validity_line,
)
from service.domain import DomainOfValidity
from tests.dicom_factory import make_dwi_series, make_sloppy, write_series
from tests.peers import dciodvfy_errors

N_SLICES, ROWS, COLUMNS = 12, 64, 64
ALGORITHM = AlgorithmInfo(name="strokeseg-unet", version="1.2.0")
WINDOW = (0.0, 500.0)


def _mask() -> npt.NDArray[np.bool_]:
    """A lesion with a hole on slices 5-6 and a single voxel at the image edge on slice 9."""
    mask = np.zeros((N_SLICES, ROWS, COLUMNS), dtype=bool)
    mask[5, 20:30, 25:33] = True
    mask[5, 23:26, 28:30] = False  # a hole: its rim is outlined too
    mask[6, 22:27, 26:31] = True
    mask[9, 0, 63] = True  # touches the image edge
    return mask


def _dwi(sources: Sequence[Dataset]) -> npt.NDArray[np.float64]:
    return np.stack([s.pixel_array.astype(np.float64) for s in sources])


@pytest.fixture
def sources() -> list[Dataset]:
    return make_dwi_series(N_SLICES, ROWS, COLUMNS)


def _write(images: list[hd.sc.SCImage], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in images:
        path = folder / f"{image.InstanceNumber:03d}.dcm"
        image.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _read_strict(path: Path) -> Dataset:
    previous = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        ds = pydicom.dcmread(path)
        for _ in ds:  # decode (and validate) every element
            pass
    finally:
        config.settings.reading_validation_mode = previous
    return ds


def _upscaled(a: npt.NDArray[np.generic], k: int) -> npt.NDArray[np.generic]:
    return np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def _expected_outline(mask_slice: npt.NDArray[np.bool_], k: int) -> npt.NDArray[np.bool_]:
    """Mask pixels (after k x k upscaling) with a 4-neighbour outside, written out longhand."""
    up = _upscaled(mask_slice, k).astype(bool)
    h, w = up.shape
    out = np.zeros_like(up)
    for y, x in zip(*np.nonzero(up), strict=True):
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            ny, nx = y + dy, x + dx
            if not (0 <= ny < h and 0 <= nx < w) or not up[ny, nx]:
                out[y, x] = True
                break
    return out


def _expected_grey(
    dwi_slice: npt.NDArray[np.float64], window: tuple[float, float]
) -> npt.NDArray[np.uint8]:
    low, high = window
    return np.rint(np.clip((dwi_slice - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _ocr_line(banner: npt.NDArray[np.uint8], top: int, left: int, scale: int) -> str:
    """Read one text line drawn with our font back into characters."""
    ink = np.asarray(banner.any(axis=2), dtype=bool)
    by_bitmap = {g.tobytes(): ch for ch, g in GLYPHS.items()}
    chars = []
    x = left
    while x + CELL_WIDTH * scale <= ink.shape[1]:
        cell = ink[top : top + CELL_HEIGHT * scale : scale, x : x + CELL_WIDTH * scale : scale]
        ch = by_bitmap.get(np.ascontiguousarray(cell).tobytes())
        if ch is None:
            raise AssertionError(f"unreadable glyph at x={x}")
        chars.append(ch)
        x += CELL_WIDTH * scale
    return "".join(chars).rstrip()


def _ocr(image: npt.NDArray[np.uint8], layout: OverlayLayout) -> list[str]:
    lines = []
    for n in range(layout.max_lines):
        top, left = layout.line_origin(n)
        lines.append(_ocr_line(image, top, left, layout.text_scale))
    return lines


# ----------------------------------------------------------------------- font


def test_font_glyphs_are_5x7_and_distinct() -> None:
    for ch, cell in GLYPHS.items():
        assert cell.shape == (CELL_HEIGHT, CELL_WIDTH), ch
        assert not np.any(cell[7, :]) and not np.any(cell[:, 5]), (
            ch
        )  # spacing row/column stay blank
    bitmaps = [g.tobytes() for ch, g in GLYPHS.items() if ch != " "]
    assert len(set(bitmaps)) == len(bitmaps)
    assert glyph("a") is GLYPHS["A"] and glyph("€") is GLYPHS["?"]


def test_draw_text_scales_and_clips() -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    draw_text(image, "HI", 2, 2, scale=2, rgb=(1, 2, 3))
    ink = np.asarray(image.any(axis=2), dtype=bool)
    assert np.array_equal(ink[2:18:2, 2:14:2], GLYPHS["H"])
    assert (image[ink] == (1, 2, 3)).all()
    assert ink[:, 14:].any()  # "I" starts at x = 14 and is clipped at the edge
    draw_text(image, "X", -3, -3)  # partly outside: no error


def test_wrap() -> None:
    assert wrap("RESEARCH USE ONLY - NOT FOR DIAGNOSIS", 16) == [
        "RESEARCH USE",
        "ONLY - NOT FOR",
        "DIAGNOSIS",
    ]
    assert wrap("ABCDEFGHIJ", 4) == ["ABCD", "EFGH", "IJ"]


def test_lesion_outline_of_a_square() -> None:
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    outline = lesion_outline(mask)
    expected = mask.copy()
    expected[2:4, 2:4] = False
    assert np.array_equal(outline, expected)
    edge = np.zeros((3, 3), bool)
    edge[0, 0] = True
    assert np.array_equal(lesion_outline(edge), edge)


def test_layout() -> None:
    layout = overlay_layout(64, 64, 4)
    assert (layout.scale, layout.width, layout.image_rows) == (8, 512, 512)
    assert layout.text_scale == 2 and layout.chars_per_line >= 40
    assert layout.max_lines == 4 and layout.height == 512 + layout.banner_rows
    assert overlay_layout(256, 192, 1).scale == 2
    assert overlay_layout(96, 96, 1, min_size=128).text_scale == 1


# --------------------------------------------------------------- the series


def test_overlay_round_trip(sources: list[Dataset], tmp_path: Path) -> None:
    mask = _mask()
    images = build_overlay_series(
        sources, _dwi(sources), mask, lesion_volume_ml=1.23, algorithm=ALGORITHM
    )
    paths = _write(images, tmp_path / "overlay")
    assert len(paths) == N_SLICES
    src = sources[0]
    series_uids = set()
    for n, path in enumerate(paths, start=1):
        ds = _read_strict(path)
        assert dciodvfy_errors(path) == [], path.name
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.Modality == "OT"
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert (ds.SeriesNumber, ds.InstanceNumber) == (9903, n)
        assert (ds.PatientID, ds.PatientName, ds.AccessionNumber) == (
            src.PatientID,
            src.PatientName,
            src.AccessionNumber,
        )
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.BitsAllocated == 8 and (ds.Rows, ds.Columns) == (512 + 4 * 20 + 16, 512)
        assert ds.BurnedInAnnotation == "NO"  # no patient identifiers are burned in
        assert ds.ConversionType == "WSD"
        assert ds.BodyPartExamined == "HEAD"
        assert list(ds.PatientOrientation) == ["L", "P"]
        assert [float(v) for v in ds.PixelSpacing] == [3.5 / 8, 3.5 / 8]
        assert DEFAULT_OVERLAY_LABEL in ds.ImageComments
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPClassUID == src.SOPClassUID
        # factory InstanceNumbers are 1..n in slice order, so image n shows slice n - 1
        assert ref.ReferencedSOPInstanceUID == sources[n - 1].SOPInstanceUID
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        series_uids.add(ds.SeriesInstanceUID)
    assert len(series_uids) == 1


def test_outline_pixels_and_nothing_else_change(sources: list[Dataset], tmp_path: Path) -> None:
    dwi = _dwi(sources)
    mask = _mask()
    with_lesion = _write(
        build_overlay_series(
            sources, dwi, mask, lesion_volume_ml=1.0, algorithm=ALGORITHM, window=WINDOW
        ),
        tmp_path / "lesion",
    )
    layout = overlay_layout(ROWS, COLUMNS, 4)
    k = layout.scale
    for i, path in enumerate(with_lesion):
        pixels = pydicom.dcmread(path).pixel_array
        image = pixels[: layout.image_rows]
        outline = _expected_outline(mask[i], k)
        grey = _upscaled(_expected_grey(dwi[i], WINDOW), k)
        assert (image[outline] == DEFAULT_OUTLINE_RGB).all(), i
        for c in range(3):  # everywhere else: the windowed DWI, untouched
            assert np.array_equal(image[~outline][:, c], grey[~outline]), i
        assert outline.any() == mask[i].any()
    # the hole's rim is outlined; the middle of the hole is not
    hole = _expected_outline(mask[5], k)
    assert bool(hole[24 * k, 27 * k + k - 1]) and not bool(hole[24 * k + k // 2, 28 * k + k // 2])


def test_banner_text_reads_back(sources: list[Dataset]) -> None:
    mask = _mask()
    probability = np.where(mask, 0.9, 0.0)
    adc = np.full(mask.shape, 800.0)
    adc[mask] = 500.0
    brain = np.ones(mask.shape, bool)
    findings = compute_lesion_findings(mask, probability, adc, brain, grid_geometry(sources))
    images = build_overlay_series(
        sources,
        _dwi(sources),
        mask,
        lesion_volume_ml=findings.total_volume_ml,
        algorithm=ALGORITHM,
        findings=findings,
        label="Research use only - not for diagnosis (site X)",
    )
    layout = overlay_layout(ROWS, COLUMNS, 5)
    assert images[0].Rows == layout.height
    text = _ocr(images[5].pixel_array, layout)
    assert text == [
        "RESEARCH USE ONLY - NOT FOR DIAGNOSIS",
        "(SITE X)",
        f"LESION VOLUME {findings.total_volume_ml:.1f} ML IN 2 LESIONS",
        "MODEL STROKESEG-UNET 1.2.0",
        "IMAGE 6 OF 12",
    ]
    banner = images[5].pixel_array[layout.image_rows :]
    colours = {tuple(int(c) for c in px) for px in banner.reshape(-1, 3)}
    assert colours == {(0, 0, 0), (255, 255, 0), (255, 255, 255)}  # label yellow, text white


def test_shuffled_sources_follow_instance_numbers(sources: list[Dataset], tmp_path: Path) -> None:
    dwi = _dwi(sources)
    mask = _mask()
    order = np.random.default_rng(3).permutation(N_SLICES)
    images = build_overlay_series(
        [sources[i] for i in order],
        dwi[order],
        mask[order],
        lesion_volume_ml=1.0,
        algorithm=ALGORITHM,
        window=WINDOW,
    )
    layout = overlay_layout(ROWS, COLUMNS, 4)
    for n, image in enumerate(images, start=1):
        assert image.InstanceNumber == n
        assert (
            image.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[n - 1].SOPInstanceUID
        )
        outline = _expected_outline(mask[n - 1], layout.scale)
        assert (image.pixel_array[: layout.image_rows][outline] == DEFAULT_OUTLINE_RGB).all()


def test_given_series_uid_makes_image_uids_stable(sources: list[Dataset]) -> None:
    series_uid = stable_uid("job-3", "overlay-series")

    def build() -> list[str]:
        images = build_overlay_series(
            sources,
            _dwi(sources),
            _mask(),
            lesion_volume_ml=1.0,
            algorithm=ALGORITHM,
            series_instance_uid=series_uid,
        )
        return [str(i.SOPInstanceUID) for i in images]

    first, second = build(), build()
    assert first == second and len(set(first)) == N_SLICES
    random_uids = build_overlay_series(
        sources, _dwi(sources), _mask(), lesion_volume_ml=1.0, algorithm=ALGORITHM
    )
    assert {str(i.SOPInstanceUID) for i in random_uids}.isdisjoint(first)


def test_sloppy_sources_give_valid_overlay(tmp_path: Path) -> None:
    sloppy = make_sloppy(make_dwi_series(N_SLICES, ROWS, COLUMNS))
    for ds in sloppy:
        del ds.BodyPartExamined
    paths = write_series(sloppy, tmp_path / "src")
    headers = [pydicom.dcmread(p) for p in paths]
    images = build_overlay_series(
        headers, _dwi(headers), _mask(), lesion_volume_ml=1.0, algorithm=ALGORITHM
    )
    for path in _write(images[4:7], tmp_path / "overlay"):
        ds = _read_strict(path)
        assert ds.PatientID == "" and ds.BodyPartExamined == "HEAD"
        assert dciodvfy_errors(path) == []


def test_auto_window() -> None:
    values = np.arange(1000, dtype=float).reshape(10, 10, 10)
    low, high = auto_window(values)
    assert low == pytest.approx(4.995) and high == pytest.approx(994.005)
    assert auto_window(np.full((2, 2, 2), 7.0)) == (7.0, 8.0)


def test_bad_inputs_raise(sources: list[Dataset]) -> None:
    dwi, mask = _dwi(sources), _mask()
    kwargs: dict[str, object] = {"lesion_volume_ml": 1.0, "algorithm": ALGORITHM}
    with pytest.raises(ValueError, match="non-grey"):
        build_overlay_series(sources, dwi, mask, outline_rgb=(200, 200, 200), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one line"):
        build_overlay_series(sources, dwi, mask, label="A\nB", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slice i must lie"):
        build_overlay_series(sources[:-1], dwi, mask, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="equal 3-D shapes"):
        build_overlay_series(sources, dwi[:, :10], mask, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="high > low"):
        build_overlay_series(sources, dwi, mask, window=(5.0, 5.0), **kwargs)  # type: ignore[arg-type]
    same_series = copy.deepcopy(sources)
    with pytest.raises(ValueError, match="new series"):
        build_overlay_series(
            same_series,
            dwi,
            mask,
            series_instance_uid=sources[0].SeriesInstanceUID,
            **kwargs,  # type: ignore[arg-type]
        )


def test_banner_says_first_when_outside_the_validated_range(sources: list[Dataset]) -> None:
    mask = _mask()
    probability = np.where(mask, 0.9, 0.0)
    adc = np.full(mask.shape, 800.0)
    adc[mask] = 500.0
    brain = np.ones(mask.shape, bool)
    validity = DomainOfValidity(
        reasons=("b=3000 s/mm2 outside the validated 900-1600", "SNR 4.2 < 6"), b_value=3000.0
    )
    findings = compute_lesion_findings(
        mask, probability, adc, brain, grid_geometry(sources), validity=validity
    )
    images = build_overlay_series(
        sources,
        _dwi(sources),
        mask,
        lesion_volume_ml=findings.total_volume_ml,
        algorithm=ALGORITHM,
        findings=findings,
    )
    layout = overlay_layout(ROWS, COLUMNS, 7)
    assert images[0].Rows == layout.height
    text = _ocr(images[5].pixel_array, layout)
    assert text == [
        "OUTSIDE VALIDATED RANGE: B=3000 S/MM2",
        "OUTSIDE THE VALIDATED 900-1600 (+1 MORE,",
        "SEE SR)",
        "RESEARCH USE ONLY - NOT FOR DIAGNOSIS",
        f"LESION VOLUME {findings.total_volume_ml:.1f} ML IN 2 LESIONS",
        "MODEL STROKESEG-UNET 1.2.0",
        "IMAGE 6 OF 12",
    ]
    banner = images[5].pixel_array[layout.image_rows :]
    top, _ = layout.line_origin(0)
    below_label, _ = layout.line_origin(4)
    warning_rows = banner[top - layout.image_rows : below_label - layout.image_rows]
    # warning and label in the label colour, numbers in white
    assert {tuple(int(c) for c in px) for px in warning_rows.reshape(-1, 3)} == {
        (0, 0, 0),
        (255, 255, 0),
    }
    assert images[0].ImageComments.startswith(
        "OUTSIDE VALIDATED RANGE: b=3000 s/mm2 outside the validated 900-1600 (+1 MORE, SEE SR); "
    )


def test_banner_has_no_warning_within_the_validated_range() -> None:
    assert validity_line(None) is None
    assert validity_line(DomainOfValidity(notes=("b=1500 harmonised",))) is None
    assert validity_line(DomainOfValidity(reasons=("SNR 4.2 < 6",))) == (
        "OUTSIDE VALIDATED RANGE: SNR 4.2 < 6"
    )
