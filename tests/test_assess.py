"""The assess stage: restricted-diffusion guard, domain of validity, b=1000-equivalent input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from service.assess import (
    AssessOptions,
    RestrictionLimits,
    ValidityLimits,
    adc_b_factor,
    assess,
    assess_validity,
    core_threshold_for_b,
    guard_restricted_diffusion,
)
from service.domain import DiffusionStudy, ImageVolume, LesionSegmentation, SourceFrame
from service.preprocess import (
    HARMONISING_PROFILES,
    PROFILES,
    ProfileOptions,
    b1000_equivalent,
    b1000_equivalent_kurtosis,
)

SHAPE = (24, 64, 64)  # 24 slices x 3.5 mm = 84 mm coverage


def _volume(voxels: npt.NDArray[np.float32], spacing: float = 3.5) -> ImageVolume:
    return ImageVolume(
        voxels=voxels.astype(np.float32),
        origin=(-110.0, -110.0, 0.0),
        row_cosine=(1.0, 0.0, 0.0),
        column_cosine=(0.0, 1.0, 0.0),
        slice_cosine=(0.0, 0.0, 1.0),
        pixel_spacing=(3.5, 3.5),
        slice_spacing=spacing,
    )


def _study(dwi: npt.NDArray[np.float32], adc: npt.NDArray[np.float32], b_value: float = 1000.0,
           spacing: float = 3.5) -> DiffusionStudy:
    return DiffusionStudy(
        study_instance_uid="1.2.3",
        dwi=_volume(dwi, spacing),
        b_value=b_value,
        adc=_volume(adc, spacing),
        dwi_sources=tuple(
            SourceFrame(path=Path(f"/x/{k}"), sop_instance_uid=f"1.2.{k}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.4")
            for k in range(dwi.shape[0])
        ),
        frame_of_reference_uid="1.2.9",
        adc_origin="computed",
    )


def _segmentation(mask: npt.NDArray[np.bool_], voxel_ml: float) -> LesionSegmentation:
    return LesionSegmentation(
        mask=mask, probability=mask.astype(np.float32), lesion_volume_ml=float(mask.sum()) * voxel_ml,
        model_name="m", model_version="1",
    )


def _brain() -> npt.NDArray[np.bool_]:
    brain = np.zeros(SHAPE, bool)
    zz, yy, xx = np.indices(SHAPE)
    brain[((yy - 32) / 26.0) ** 2 + ((xx - 32) / 22.0) ** 2 <= 1.0] = True
    return brain


def _head(seed: int = 0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Trace and ADC of a noisy 'brain' (ADC ~800, DWI ~500) on a zero background."""
    rng = np.random.default_rng(seed)
    brain = _brain()
    adc = np.where(brain, rng.normal(800.0, 30.0, SHAPE), 0.0).astype(np.float32)
    dwi = np.where(brain, rng.normal(500.0, 10.0, SHAPE), 0.0).astype(np.float32)
    return dwi, adc, brain


def test_guard_keeps_restricted_lesions_and_lists_the_mimics() -> None:
    dwi, adc, brain = _head()
    mask = np.zeros(SHAPE, bool)
    infarct = (slice(4, 8), slice(20, 26), slice(20, 26))  # ADC 450: acute, kept
    shine = (slice(10, 13), slice(20, 26), slice(36, 42))  # ADC 950: T2 shine-through
    mild = (slice(15, 18), slice(36, 42), slice(20, 26))  # ADC 720: below 750 but rADC 0.9
    mask[infarct] = mask[shine] = mask[mild] = True
    adc[infarct] = 450.0
    adc[shine] = 950.0
    adc[mild] = 720.0
    mask[20, 1:4, 1:4] = True  # outside the brain (scalp / background)
    study = _study(dwi, adc)
    seg = _segmentation(mask, study.dwi.voxel_volume_ml)

    guarded = guard_restricted_diffusion(seg, study.dwi, study.adc, brain)
    kept = guarded.segmentation
    assert kept.mask[infarct].all()
    assert kept.mask.sum() == 4 * 6 * 6
    assert kept.lesion_volume_ml == pytest.approx(4 * 6 * 6 * study.dwi.voxel_volume_ml)
    assert guarded.reference_adc == pytest.approx(800.0, abs=5.0)
    reasons = [m.reason for m in guarded.mimics]
    assert len(reasons) == 3
    assert any("outside the brain" in r for r in reasons)
    shine_mimic = next(m for m in guarded.mimics if m.mean_adc and m.mean_adc > 900)
    assert "without restricted diffusion" in shine_mimic.reason and "mean ADC 950" in shine_mimic.reason
    assert (shine_mimic.first_slice, shine_mimic.last_slice) == (10, 12)
    mild_mimic = next(m for m in guarded.mimics if m.mean_adc and 700 < m.mean_adc < 750)
    assert "rADC 0.90" in mild_mimic.reason and "mean ADC" not in mild_mimic.reason.split("(")[1]
    assert mild_mimic.relative_adc == pytest.approx(0.9, abs=0.02)


def test_guard_limits_are_configurable_and_the_brain_rule_always_holds() -> None:
    dwi, adc, brain = _head(1)
    mask = np.zeros(SHAPE, bool)
    mask[10:13, 20:26, 36:42] = True
    adc[10:13, 20:26, 36:42] = 950.0
    mask[20, 1:4, 1:4] = True
    study = _study(dwi, adc)
    seg = _segmentation(mask, study.dwi.voxel_volume_ml)
    off = guard_restricted_diffusion(seg, study.dwi, study.adc, brain, RestrictionLimits(enabled=False))
    assert off.segmentation.mask[10:13, 20:26, 36:42].all()
    assert not off.segmentation.mask[20].any()  # outside the brain never counts
    loose = guard_restricted_diffusion(
        seg, study.dwi, study.adc, brain, RestrictionLimits(max_mean_adc=1000.0, max_relative_adc=1.3)
    )
    assert loose.segmentation.mask.sum() == 3 * 6 * 6


def test_validity_within_for_an_ordinary_study() -> None:
    dwi, adc, brain = _head(2)
    study = _study(dwi, adc)
    validity = assess_validity(study, _segmentation(np.zeros(SHAPE, bool), 0.1), brain)
    assert validity.within, validity.reasons
    assert validity.status == "within"
    assert validity.summary() == "within the model's validated range"
    assert validity.adc_core_threshold == 620.0
    assert dict(validity.measures)["coverage_mm"] == pytest.approx(84.0)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"b_value": 2500.0}, "b=2500 s/mm2 outside the validated 900-1600"),
        ({"spacing": 8.0}, "slice spacing 8.0 mm outside"),
        ({"adc_scale": 0.0}, "ADC brain median unavailable"),
        ({"adc_scale": 1.6}, "ADC brain median 1280 outside the plausible 600-1100"),
        ({"short": True}, "coverage"),
        ({"noise": 200.0}, "SNR"),
    ],
)
def test_validity_reasons(change: dict[str, float], expected: str) -> None:
    dwi, adc, brain = _head(3)
    rng = np.random.default_rng(9)
    if "adc_scale" in change:
        adc = adc * change["adc_scale"]
    if "noise" in change:
        dwi = np.where(brain, dwi + rng.normal(0.0, change["noise"], SHAPE), 0.0).astype(np.float32)
    if change.get("short"):
        dwi, adc, brain = dwi[:10], adc[:10], brain[:10]
    study = _study(dwi, adc, b_value=change.get("b_value", 1000.0), spacing=change.get("spacing", 3.5))
    validity = assess_validity(study, _segmentation(np.zeros(dwi.shape, bool), 0.1), brain)
    assert not validity.within
    assert any(expected in r for r in validity.reasons), validity.reasons
    assert validity.summary().startswith("OUTSIDE VALIDATED RANGE: ")


def test_validity_flags_a_bilateral_symmetric_pattern_but_not_a_one_sided_lesion() -> None:
    dwi, adc, brain = _head(4)
    study = _study(dwi, adc)
    voxel_ml = study.dwi.voxel_volume_ml
    ribbon = np.zeros(SHAPE, bool)
    ribbon[4:20, 20:44, 12:15] = True  # left and right rims, mirror images across x = 32
    ribbon[4:20, 20:44, 49:52] = True
    flagged = assess_validity(study, _segmentation(ribbon, voxel_ml), brain)
    assert any("bilateral symmetric" in r for r in flagged.reasons)
    one_sided = np.zeros(SHAPE, bool)
    one_sided[4:20, 20:44, 12:18] = True
    assert not any(
        "symmetric" in r for r in assess_validity(study, _segmentation(one_sided, voxel_ml), brain).reasons
    )


def test_validity_flags_a_lesion_covering_much_of_the_brain() -> None:
    dwi, adc, brain = _head(5)
    study = _study(dwi, adc)
    half = brain.copy()
    half[:, :, 32:] = False
    validity = assess_validity(study, _segmentation(half, study.dwi.voxel_volume_ml), brain)
    assert any("% of the brain" in r for r in validity.reasons)


def test_adc_core_threshold_and_plausible_range_follow_the_b_value() -> None:
    assert adc_b_factor(1000.0) == 1.0 == adc_b_factor(1080.0)
    assert adc_b_factor(1500.0) == pytest.approx(1 - 0.8 * 0.8e-3 * 500 / 6)
    assert adc_b_factor(2500.0) < adc_b_factor(2000.0) < adc_b_factor(1500.0) < 1.0
    assert core_threshold_for_b(620.0, 1500.0) == pytest.approx(620.0 * adc_b_factor(1500.0))
    dwi, adc, brain = _head(6)
    validity = assess_validity(_study(dwi, adc, b_value=1500.0), _segmentation(np.zeros(SHAPE, bool), 0.1),
                               brain, harmonised=True)
    assert validity.within
    assert validity.adc_core_threshold == pytest.approx(587, abs=1)
    assert any("harmonised to a b=1000-equivalent" in n for n in validity.notes)
    assert any("ADC core threshold 587" in n for n in validity.notes)


def test_assess_runs_guard_then_validity_on_the_guarded_mask() -> None:
    dwi, adc, brain = _head(7)
    mask = np.zeros(SHAPE, bool)
    mask[2:22, 8:56, 8:56] = brain[2:22, 8:56, 8:56]  # a "lesion" of normal ADC over most of the brain
    study = _study(dwi, adc)
    result = assess(study, _segmentation(mask, study.dwi.voxel_volume_ml), brain, AssessOptions())
    assert result.segmentation.lesion_volume_ml == 0.0  # the guard removed it ...
    assert result.validity.within  # ... so the reported result is not an implausible one
    unguarded = assess(
        study, _segmentation(mask, study.dwi.voxel_volume_ml), brain,
        AssessOptions(restriction=RestrictionLimits(enabled=False), validity=ValidityLimits()),
    )
    assert not unguarded.validity.within


def test_b1000_equivalent_trace_from_the_acquired_pair() -> None:
    rng = np.random.default_rng(11)
    s0 = rng.uniform(500.0, 1500.0, SHAPE).astype(np.float32)
    adc = rng.uniform(300.0, 3500.0, SHAPE).astype(np.float32)
    for b in (1000.0, 1500.0, 2500.0):
        trace = (s0 * np.exp(-b * np.minimum(adc, 3000.0) * 1e-6)).astype(np.float32)
        study = _study(trace, adc, b_value=b)
        expected = s0 * np.exp(-1000.0 * np.minimum(adc, 3000.0) * 1e-6)
        np.testing.assert_allclose(b1000_equivalent(study).voxels, expected, rtol=1e-4)
    at_1000 = _study(s0, adc, b_value=1000.0)
    np.testing.assert_array_equal(b1000_equivalent(at_1000).voxels, s0)


def test_harmonising_profiles_feed_the_same_contrast_at_any_b() -> None:
    rng = np.random.default_rng(12)
    s0 = rng.uniform(800.0, 1200.0, SHAPE).astype(np.float32)
    adc = rng.uniform(600.0, 1000.0, SHAPE).astype(np.float32)
    profile = PROFILES["b1000eq-median-adc-fixed-v2"]
    assert "b1000eq-median-adc-fixed-v2" in HARMONISING_PROFILES
    inputs = []
    for b in (1000.0, 2000.0):
        trace = (s0 * np.exp(-b * adc * 1e-6)).astype(np.float32)
        dwi_n, _ = profile(_study(trace, adc, b_value=b), ProfileOptions())
        inputs.append(dwi_n)
    np.testing.assert_allclose(inputs[0], inputs[1], rtol=1e-3, atol=1e-4)


def test_kurtosis_aware_harmonisation_recovers_the_b1000_study() -> None:
    """Tissue with kurtosis 0.8 acquired at b=2500: v3 brings trace and ADC back to the b=1000
    study; v2 (mono-exponential) leaves the ADC 16 % low and the lesion contrast flattened."""
    d = np.full(SHAPE, 0.85e-3)  # tissue diffusivity (mm2/s)
    d[8:14, 20:30, 20:30] = 0.42e-3  # an acute lesion
    s0 = np.full(SHAPE, 1000.0)
    k = 0.8

    def acquired(b: float) -> DiffusionStudy:
        trace = s0 * np.exp(-b * d + b**2 * d**2 * k / 6.0)
        adc = (d - b * d**2 * k / 6.0) * 1e6  # the scanner's two-point ADC
        return _study(trace.astype(np.float32), adc.astype(np.float32), b_value=b)

    at_1000, at_2500 = acquired(1000.0), acquired(2500.0)
    lesion, tissue = (slice(8, 14), slice(20, 30), slice(20, 30)), (slice(2, 6), slice(40, 50), slice(40, 50))

    def contrast(study: DiffusionStudy) -> float:
        return float(study.dwi.voxels[lesion].mean() / study.dwi.voxels[tissue].mean())

    v3 = b1000_equivalent_kurtosis(at_2500)
    assert v3.b_value == 2500.0  # the study keeps its acquired b; only the network input changes
    # the population factor (first order in b, service.diffusion) is within 5 % of the exact ratio
    np.testing.assert_allclose(v3.adc.voxels[tissue], at_1000.adc.voxels[tissue], rtol=0.05)
    assert contrast(v3) == pytest.approx(contrast(at_1000), rel=0.05)
    v2_contrast = float(b1000_equivalent(at_2500).voxels[lesion].mean() / b1000_equivalent(at_2500).voxels[tissue].mean())
    assert abs(v2_contrast - contrast(at_1000)) > 2 * abs(contrast(v3) - contrast(at_1000))
    assert at_2500.adc.voxels[tissue].mean() < 0.86 * at_1000.adc.voxels[tissue].mean()
    # near b=1000 it is the v2 harmonisation exactly
    near = acquired(1050.0)
    np.testing.assert_array_equal(b1000_equivalent_kurtosis(near).dwi.voxels, b1000_equivalent(near).voxels)
    np.testing.assert_allclose(b1000_equivalent_kurtosis(near).adc.voxels, near.adc.voxels, rtol=1e-6)
    for name in ("b1000eq-median-adc-fixed-v3", "noh-b1000eq-n4-histpeak-v3", "alis-b1000eq-window-v3"):
        assert name in HARMONISING_PROFILES


def test_guard_sets_aside_fat_bright_on_dwi_with_near_zero_adc() -> None:
    """Scalp fat after a fat-suppression failure: bright on b1000, ADC ~0-150 (inside a head mask)."""
    dwi, adc, brain = _head(13)
    mask = np.zeros(SHAPE, bool)
    rim = (slice(5, 15), slice(30, 34), slice(13, 16))
    mask[rim] = True
    adc[rim] = 80.0
    study = _study(dwi, adc)
    guarded = guard_restricted_diffusion(mask_segmentation := _segmentation(mask, study.dwi.voxel_volume_ml),
                                         study.dwi, study.adc, brain)
    assert guarded.segmentation.lesion_volume_ml == 0.0
    (mimic,) = guarded.mimics
    assert "implausibly low ADC" in mimic.reason and "mean ADC 80 < 200" in mimic.reason
    permissive = guard_restricted_diffusion(
        mask_segmentation, study.dwi, study.adc, brain, RestrictionLimits(min_mean_adc=0.0)
    )
    assert permissive.segmentation.mask[rim].all()
