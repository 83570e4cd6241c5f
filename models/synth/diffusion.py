"""Diffusion MRI signal model: tissue S0/ADC, lesions, bias field, Rician noise, ADC.

Mono-exponential decay ``S(b) = S0 * exp(-b * ADC)`` per tissue; acute
ischaemic lesions have low ADC (0.35-0.55e-3 mm2/s) and a slightly raised S0
(T2 shine-through), which is what makes them bright on the b1000 trace and dark
on the ADC map.  The ADC map is computed the way scanners do, from the *noisy*
b0 and b1000 images, so it carries realistic noise and background handling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

B_VALUE = 1000.0
#: ADC maps are clipped to this (mm2/s) and stored in units of 1e-6 mm2/s.
ADC_MAX = 5e-3
ADC_UNIT = 1e-6


@dataclass(frozen=True, slots=True)
class TissueParameters:
    """Relative S0 and ADC (mm2/s) of GM, WM, CSF and scalp for one phantom."""

    s0: tuple[float, float, float, float]
    adc: tuple[float, float, float, float]

    def signal_weights(self, b_value: float) -> npt.NDArray[np.float32]:
        """Per-tissue signal at ``b_value`` (linear weights for the tissue maps)."""
        s0 = np.asarray(self.s0)
        return np.asarray(s0 * np.exp(-b_value * np.asarray(self.adc)), dtype=np.float32)


def random_tissue_parameters(rng: np.random.Generator) -> TissueParameters:
    """Literature-like values with a few per cent of per-case jitter."""
    jitter = rng.normal(1.0, 0.04, size=4).clip(0.9, 1.1)
    s0 = (0.55 * jitter[0], 0.45 * jitter[1], 1.0 * jitter[2], float(rng.uniform(0.06, 0.12)))
    adc_jitter = rng.normal(1.0, 0.04, size=3).clip(0.9, 1.1)
    adc = (
        0.80e-3 * adc_jitter[0],
        0.70e-3 * adc_jitter[1],
        3.0e-3 * adc_jitter[2],
        float(rng.uniform(2.5e-3, 3.5e-3)),  # fat-suppressed scalp: ~nothing at b1000
    )
    return TissueParameters(
        s0=tuple(float(v) for v in s0),  # type: ignore[arg-type]
        adc=tuple(float(v) for v in adc),  # type: ignore[arg-type]
    )


def bias_field(
    rng: np.random.Generator, shape: tuple[int, int, int], amplitude: float
) -> npt.NDArray[np.float32]:
    """Smooth multiplicative field within ``1 +- amplitude`` (low-order polynomial)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    k, r, c = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [k, r, c, k * r, k * c, r * c, r * r - 0.33, c * c - 0.33, k * k - 0.33]
    coeffs = rng.normal(0.0, 1.0, size=len(terms))
    field = sum(float(w) * t for w, t in zip(coeffs, terms, strict=True))
    field = np.broadcast_to(field, shape).astype(np.float32)
    field *= amplitude / (float(np.abs(field).max()) + 1e-6)
    return 1.0 + field


def rician(
    rng: np.random.Generator, signal: npt.NDArray[np.float32], sigma: float
) -> npt.NDArray[np.float32]:
    """Magnitude of the signal plus complex Gaussian noise of std ``sigma``."""
    real = signal + rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    imag = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt(real * real + imag * imag)


def scanner_adc(
    s0: npt.NDArray[np.float32],
    s_b: npt.NDArray[np.float32],
    b_value: float,
    background_threshold: float,
) -> npt.NDArray[np.float32]:
    """ADC = -ln(S_b / S0) / b, clipped to [0, ADC_MAX], 0 where S0 is background."""
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = -np.log(np.maximum(s_b, 1e-6) / np.maximum(s0, 1e-6)) / np.float32(b_value)
    adc = np.clip(adc, 0.0, ADC_MAX)
    adc[s0 < background_threshold] = 0.0
    return adc.astype(np.float32)
