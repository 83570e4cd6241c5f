"""Preprocessing profiles and the model grid, on a phantom study read through intake."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.domain import DiffusionStudy
from service.intake import load_study
from service.preprocess import (
    PROFILES,
    ModelGrid,
    ProfileOptions,
    VendorWindow,
    VendorWindows,
    Window,
    brain_mask,
    histogram_peak_normalise,
    n4_correct,
    resample_to_model_grid,
    to_model_input,
    to_native_grid,
)


@pytest.fixture(scope="module")
def study(phantom_cases: list[Path]) -> DiffusionStudy:
    return load_study(sorted((phantom_cases[0] / "dicom").rglob("*.dcm")))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_gives_a_finite_two_channel_input(study: DiffusionStudy, profile: str) -> None:
    model_input = to_model_input(study, ModelGrid((96, 96), (2.4, 2.4)), profile)
    assert model_input.tensor.shape == (study.dwi.shape[0], 2, 96, 96)
    assert np.isfinite(model_input.tensor).all()
    assert model_input.tensor[:, 0].max() > 0 and model_input.tensor[:, 1].max() > 0


def test_model_grid_round_trip_keeps_geometry(study: DiffusionStudy) -> None:
    model_input = to_model_input(study, ModelGrid((128, 128), (1.8, 1.8)))
    # A mask on the native grid survives native -> model -> native (up to interpolation at edges).
    mask = np.zeros(study.dwi.shape, dtype=np.float32)
    z, r, c = (s // 2 for s in study.dwi.shape)
    mask[z - 1 : z + 2, r - 15 : r + 15, c - 15 : c + 15] = 1.0
    on_model = resample_to_model_grid(study.dwi.with_voxels(mask), model_input).voxels
    back = to_native_grid(on_model, model_input, study.dwi) >= 0.5
    overlap = (back & (mask > 0)).sum() / (mask > 0).sum()
    assert overlap > 0.9 and back.sum() == pytest.approx(mask.sum(), rel=0.15)
    # Physical size is preserved: same volume in mL on both grids.
    model_ml = float((on_model >= 0.5).sum()) * np.prod(model_input.grid.pixel_spacing) * model_input.grid.slice_spacing / 1000
    assert model_ml == pytest.approx(float(mask.sum()) * study.dwi.voxel_volume_ml, rel=0.15)


def test_otsu_brain_mask_is_the_head_not_the_background(study: DiffusionStudy) -> None:
    mask = brain_mask(study.dwi)
    centre = tuple(s // 2 for s in study.dwi.shape)
    assert mask[centre]
    assert not mask[:, 0, 0].any()  # a corner is background
    assert 0.05 < mask.mean() < 0.6


def test_n4_removes_a_synthetic_bias_field(study: DiffusionStudy) -> None:
    mask = brain_mask(study.dwi)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in study.dwi.shape), indexing="ij")
    field = (1.0 + 0.3 * x + 0.2 * y).astype(np.float32)
    biased = study.dwi.with_voxels(study.dwi.voxels * field)
    corrected = n4_correct(biased, mask)
    ratio_before = biased.voxels[mask] / np.maximum(study.dwi.voxels[mask], 1)
    ratio_after = corrected[mask] / np.maximum(study.dwi.voxels[mask], 1)
    # The left/right gradient of the imposed field shrinks after correction.
    left, right = x[mask] < -0.3, x[mask] > 0.3
    gradient_before = np.median(ratio_before[right]) / np.median(ratio_before[left])
    gradient_after = np.median(ratio_after[right]) / np.median(ratio_after[left])
    assert abs(gradient_after - 1) < 0.5 * abs(gradient_before - 1)


def test_histogram_peak_lands_at_150() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(400, 20, size=(3, 64, 64)).astype(np.float32)
    mask = np.ones(values.shape, dtype=bool)
    out = histogram_peak_normalise(values, mask)
    assert np.median(out) == pytest.approx(150, abs=8)
    hot = values.copy()
    hot[0, :5, :5] = 5000
    assert histogram_peak_normalise(hot, mask).max() == 255.0


def test_vendor_windows_pick_by_manufacturer() -> None:
    windows = VendorWindows(
        by_manufacturer={"GE": VendorWindow(Window(0, 800), Window(0, 2500))},
        default=VendorWindow(Window(0, 1500), Window(0, 3000)),
    )
    assert windows.for_manufacturer("GE MEDICAL SYSTEMS").dwi.high == 800
    assert windows.for_manufacturer("Philips").dwi.high == 1500
    with pytest.raises(ValueError):
        Window(10, 10)
    options = ProfileOptions(windows)
    assert options.vendor_windows is windows
