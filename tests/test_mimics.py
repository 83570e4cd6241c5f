"""Lesion mimics of the phantom generator: each has its physical signature and no truth.

Every test images the same seed twice, with only one mimic forced on and with
none; the noise realisation is the same, so differences are the mimic's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from models.synth import PhantomStudy, generate_phantom, write_phantom_study
from models.synth.mimics import (
    DEFAULT_MIMIC_PROBABILITIES,
    MIMIC_NAMES,
    draw_mimics,
    mimic_probabilities,
)

SEED = 311  # < 1000: never a training case
KW = {"lesion_class": "medium", "matrix": 128, "with_tissue_maps": True}


@pytest.fixture(scope="module")
def off() -> PhantomStudy:
    return generate_phantom(SEED, mimics=False, **KW)


def _on(name: str, off: PhantomStudy) -> PhantomStudy:
    on = generate_phantom(SEED, mimics=[name], **KW)
    assert on.mimics == (name,) and off.mimics == ()
    np.testing.assert_array_equal(on.mask, off.mask)  # a mimic is never a lesion
    assert on.lesion_volume_ml == off.lesion_volume_ml > 0
    return on


def _f(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64)


def _brain(study: PhantomStudy) -> np.ndarray:
    assert study.tissue_fractions is not None
    return study.tissue_fractions.sum(axis=0) > 0.5


def _ribbon_ratio(study: PhantomStudy) -> float:
    assert study.tissue_fractions is not None
    gm, wm, csf = study.tissue_fractions
    cortex = (gm > 0.6) & (csf < 0.15) & (study.fractions == 0)
    white = (wm > 0.9) & (study.fractions == 0)
    return float(np.median(study.dwi[cortex]) / np.median(study.dwi[white]))


def test_cortical_ribbon_gm_brighter_than_wm_on_trace(off: PhantomStudy) -> None:
    on = _on("cortical_ribbon", off)
    assert 1.1 <= _ribbon_ratio(on) <= 1.3
    assert _ribbon_ratio(on) > _ribbon_ratio(off)
    adc = on.tissue_parameters.adc
    assert 0.80e-3 <= adc[0] <= 0.90e-3 and 0.70e-3 <= adc[1] <= 0.75e-3


def test_t2_shine_through_bright_on_dwi_adc_not_low(off: PhantomStudy) -> None:
    on = _on("t2_shine_through", off)
    where = _brain(off) & (_f(on.b0) - _f(off.b0) > 4 * off.noise_sigma)
    assert where.sum() > 50
    assert np.median(_f(on.b0[where]) / _f(off.b0[where])) > 1.25
    assert np.median(_f(on.dwi[where]) / _f(off.dwi[where])) > 1.08  # DWI up
    assert np.median(on.adc[where]) >= np.median(off.adc[where])  # ADC not down
    assert not on.mask[where].any()


def test_chronic_infarct_dark_on_dwi_adc_high(off: PhantomStudy) -> None:
    on = _on("chronic_infarct", off)
    where = _brain(off) & (_f(on.adc) - _f(off.adc) > 300)
    assert where.sum() > 20
    assert np.median(_f(on.dwi[where]) / _f(off.dwi[where])) < 0.85  # DWI down
    assert np.median(on.adc[where]) > 1300  # ADC up
    assert not on.mask[where].any()


def test_susceptibility_piles_up_b0_and_dwi_alike(off: PhantomStudy) -> None:
    on = _on("susceptibility", off)
    signal = off.b0 > 10 * off.noise_sigma
    b0_ratio = _f(on.b0) / np.maximum(_f(off.b0), 1.0)
    dwi_ratio = _f(on.dwi) / np.maximum(_f(off.dwi), 1.0)
    pile = signal & (b0_ratio > 1.4)
    assert pile.sum() > 30
    assert np.median(dwi_ratio[pile]) > 1.25  # the high-b image piles up too
    adc_ratio = _f(on.adc[pile]) / np.maximum(_f(off.adc[pile]), 1.0)
    assert 0.7 < np.median(adc_ratio) < 1.5  # so the ADC is roughly normal
    assert (signal & (b0_ratio < 0.6)).sum() > 30  # beside dropout
    sources = on.mimic_parameters["susceptibility"]["sources"]  # type: ignore[index]
    assert all(1.5 <= s["pile_up"] <= 3.0 for s in sources)
    assert not on.mask[pile].any()


def test_nyquist_ghost_half_fov_away(off: PhantomStudy) -> None:
    on = _on("nyquist_ghost", off)
    head = ndi.binary_dilation(off.b0 > 5 * off.noise_sigma, iterations=3)
    half = off.geometry.shape[1] // 2
    ghost_zone = np.roll(off.b0 > 5 * off.noise_sigma, half, axis=1) & ~head
    assert ghost_zone.sum() > 1000
    gained = _f(on.b0[ghost_zone]) - _f(off.b0[ghost_zone])
    source = _f(off.b0)[np.roll(ghost_zone, -half, axis=1)]
    ratio = gained.mean() / source.mean()
    params = on.mimic_parameters["nyquist_ghost"]  # type: ignore[index]
    assert 0.01 < ratio < 0.1 and 0.02 <= params["amplitude_b0"] <= 0.08
    # Elsewhere in the background nothing changes.
    far = ~head & ~ghost_zone & ~np.roll(head, half, axis=1)
    assert np.abs(_f(on.b0[far]) - _f(off.b0[far])).mean() < 0.5


def test_csf_partial_volume_gives_intermediate_adc(off: PhantomStudy) -> None:
    on = _on("csf_partial_volume", off)
    icv = _brain(off)

    def intermediate(s: PhantomStudy) -> float:
        adc = s.adc[icv]
        return float(np.mean((adc > 1000) & (adc < 2500)))

    assert intermediate(off) > 0.15  # the anatomy already has partial volume
    assert intermediate(on) > intermediate(off) + 0.03
    assert on.tissue_fractions is not None and off.tissue_fractions is not None
    assert on.tissue_fractions[2].sum() > off.tissue_fractions[2].sum()


def test_eyes_bright_b0_dark_b1000_high_adc(off: PhantomStudy) -> None:
    on = _on("eyes", off)
    eyes = (_f(on.b0) > 3 * np.maximum(_f(off.b0), 1.0)) & (on.b0 > 10 * off.noise_sigma)
    assert eyes.sum() > 100
    assert np.median(on.adc[eyes]) > 2500
    assert np.median(_f(on.dwi[eyes]) / _f(on.b0[eyes])) < 0.15
    assert not on.mask[eyes].any()


def test_scalp_fat_bright_on_b1000_with_low_adc(off: PhantomStudy) -> None:
    on = _on("scalp_fat", off)
    fat = _f(on.dwi) - _f(off.dwi) > 5 * off.noise_sigma
    assert fat.sum() > 200
    # Fat hardly diffuses: what it adds to b0 it adds to b1000, and its ADC is low.
    gain_b0 = np.median(_f(on.b0[fat]) - _f(off.b0[fat]))
    gain_dwi = np.median(_f(on.dwi[fat]) - _f(off.dwi[fat]))
    assert gain_dwi == pytest.approx(gain_b0, rel=0.2)
    assert np.median(on.adc[fat]) < 0.6 * np.median(off.adc[fat])
    assert not on.mask[fat].any()


def test_mimics_off_reproduces_generator_1_0() -> None:
    """``mimics=False`` gives the default phantom of before (tests/test_domains.py's digest)."""
    study = generate_phantom(311, lesion_class="medium", matrix=128, mimics=False)
    digest = hashlib.sha256()
    for array in (study.b0, study.dwi, study.adc, study.mask):
        digest.update(np.ascontiguousarray(array).tobytes())
    assert digest.hexdigest() == (
        "36950137356c463f3fefc6d8ff3d546539719a55283bc5f72aa817094f4958b8"
    )


def test_draws_and_arguments() -> None:
    assert set(DEFAULT_MIMIC_PROBABILITIES) == set(MIMIC_NAMES)
    assert mimic_probabilities(None) == DEFAULT_MIMIC_PROBABILITIES
    assert set(mimic_probabilities(False).values()) == {0.0}
    assert mimic_probabilities("eyes,nyquist_ghost")["eyes"] == 1.0
    with pytest.raises(ValueError, match="unknown mimic"):
        mimic_probabilities(["brain_tumour"])
    # Independent per mimic: forcing one on leaves the others' draws alone.
    for seed in range(20):
        default = set(draw_mimics(seed).drawn)
        forced = set(draw_mimics(seed, {**DEFAULT_MIMIC_PROBABILITIES, "eyes": 1.0}).drawn)
        assert forced - {"eyes"} == default - {"eyes"}
    counts = {n: 0 for n in MIMIC_NAMES}
    for seed in range(2000):
        for name in draw_mimics(seed).drawn:
            counts[name] += 1
    for name, p in DEFAULT_MIMIC_PROBABILITIES.items():
        assert counts[name] / 2000 == pytest.approx(p, abs=0.04)


def test_truth_json_lists_mimics(tmp_path: Path) -> None:
    study = generate_phantom(SEED, lesion_class="small", matrix=128,
                             mimics=["nyquist_ghost", "chronic_infarct"])
    case = write_phantom_study(study, tmp_path / "case")
    truth = json.loads((case / "truth" / "truth.json").read_text())
    assert truth["mimics"] == ["nyquist_ghost", "chronic_infarct"]
    assert set(truth["mimic_parameters"]) == {"nyquist_ghost", "chronic_infarct"}
    plain = generate_phantom(SEED, lesion_class="small", matrix=128, mimics=False)
    np.testing.assert_array_equal(np.load(case / "truth" / "mask.npy"), plain.mask)
