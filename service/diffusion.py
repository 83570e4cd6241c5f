"""Diffusion physics shared by preprocessing and assessment: how the ADC depends on b.

Brain diffusion is not mono-exponential: with diffusional kurtosis ``K`` (about 0.8 in brain,
Jensen et al. 2005) a scanner's two-point ADC at b is ``ADC(b) ~ ADC(1000) (1 - K ADC (b - 1000)
/ 6)``.  With ADC ~ 0.8e-3 mm2/s that is about -1.07 % per 100 s/mm2 above b=1000 (a real Canon
b=1500 scan here: normal-brain median 762 against 789-804 on the b=1000 scans, -3.5 %; the
formula gives -5.3 %).  Thresholds that are b~1000 numbers (the ADC core, the plausible-ADC
range) and the network's b=1000-equivalent input are brought to the acquired b with this factor.
A leaf: it imports nothing from the service.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Typical brain diffusional kurtosis and ADC (mm2/s) behind :func:`adc_b_factor`.
BRAIN_KURTOSIS = 0.8
BRAIN_ADC_MM2_S = 0.8e-3
REFERENCE_B_VALUE = 1000.0
#: |b - 1000| up to this counts as "about 1000": nothing is scaled or flagged.
B1000_TOLERANCE = 100.0


def adc_b_factor(b_value: float) -> float:
    """Expected ADC(b) / ADC(1000) of normal brain (kurtosis model, module docstring)."""
    if abs(b_value - REFERENCE_B_VALUE) <= B1000_TOLERANCE:
        return 1.0
    factor = 1.0 - BRAIN_KURTOSIS * BRAIN_ADC_MM2_S * (b_value - REFERENCE_B_VALUE) / 6.0
    return float(min(max(factor, 0.6), 1.1))


#: Diffusivity (mm2/s) below which a voxel is tissue (kurtosis ``BRAIN_KURTOSIS``) and above
#: which it is free water (kurtosis 0); linear between (partial volume).
TISSUE_D_MM2_S = 1.5e-3
CSF_D_MM2_S = 2.5e-3


def kurtosis_map(diffusivity: npt.NDArray[np.float64], tissue_kurtosis: float = BRAIN_KURTOSIS) -> npt.NDArray[np.float64]:
    """``tissue_kurtosis`` in tissue, 0 in CSF, linear between (diffusivity in mm2/s)."""
    weight = np.clip((CSF_D_MM2_S - diffusivity) / (CSF_D_MM2_S - TISSUE_D_MM2_S), 0.0, 1.0)
    return tissue_kurtosis * weight


def diffusivity_from_adc(
    adc_mm2_s: npt.NDArray[np.float64], b_value: float, tissue_kurtosis: float = BRAIN_KURTOSIS,
    iterations: int = 8,
) -> npt.NDArray[np.float64]:
    """``D`` such that the two-point ``ADC(b) = D - b D^2 K(D) / 6`` (fixed point; brain values)."""
    d = np.asarray(adc_mm2_s, dtype=np.float64).copy()
    for _ in range(iterations):
        d = adc_mm2_s + b_value * d**2 * kurtosis_map(d, tissue_kurtosis) / 6.0
        d = np.minimum(d, 3.0 * np.maximum(adc_mm2_s, 1e-6))  # guard the non-physical branch
    return d


def adc_at_b(
    adc_mm2_s: npt.NDArray[np.float64], b_from: float, b_to: float, tissue_kurtosis: float = BRAIN_KURTOSIS
) -> npt.NDArray[np.float64]:
    """The two-point ADC a voxel would show at ``b_to``, given its ADC at ``b_from`` (per voxel:
    the kurtosis term grows with D^2, so a low-ADC lesion changes less than normal tissue).

    The map ADC(b_from) -> ADC(b_to) is one monotonic curve for given b-values, so it is solved
    on a 1e-6 mm2/s grid and interpolated: a 40 x 256 x 256 volume in milliseconds rather than
    the fixed point on every voxel.
    """
    adc = np.asarray(adc_mm2_s, dtype=np.float64)
    step = 1e-6
    position = np.clip(adc, 0.0, None) / step
    n = int(np.ceil(float(position.max(initial=0.0)))) + 2
    grid = np.arange(n, dtype=np.float64) * step
    d = diffusivity_from_adc(grid, b_from, tissue_kurtosis)
    curve = d - b_to * d**2 * kurtosis_map(d, tissue_kurtosis) / 6.0
    index = position.astype(np.int64)  # uniform grid: linear interpolation without a search
    fraction = position - index
    return curve[index] * (1.0 - fraction) + curve[index + 1] * fraction


__all__ = [
    "CSF_D_MM2_S",
    "TISSUE_D_MM2_S",
    "adc_at_b",
    "diffusivity_from_adc",
    "kurtosis_map","B1000_TOLERANCE", "BRAIN_ADC_MM2_S", "BRAIN_KURTOSIS", "REFERENCE_B_VALUE", "adc_b_factor"]
