"""A real study as it would look at a higher b-value: real anatomy, kurtosis physics, real noise.

Why: the issue's outside testers saw the phantom-only model call healthy brains infarcted at
b=2000 (98-224 mL) and b=2500 (371-591 mL).  Our real scans are b=1000 (Siemens, Philips) and
b=1500 (Canon), so the served model was never measured on real anatomy at the b-values where
that failure was worst.  This module derives such a study from a real one, in memory, so the
service path (harmonisation, network, guard, validity) can be measured on it.

Physics, per voxel (``D`` the diffusivity, ``K`` the diffusional kurtosis, Jensen et al. 2005):

* ``ln S(b) = ln S0 - b D + b^2 D^2 K / 6``.  A scanner's two-point ADC at ``b`` is therefore
  ``ADC(b) = D - b D^2 K / 6``: it falls with b in tissue (K about 0.8 in brain) and not in
  free water (K = 0).  ``D`` is recovered from the study's own ADC at its own b by solving
  that relation.
* ``K`` is :data:`TISSUE_KURTOSIS` where ``D`` is tissue-like (below 1.5e-3 mm2/s), 0 in CSF
  (above 2.5e-3) and linear between (partial volume): :func:`service.diffusion.kurtosis_map`.
* ``S0 = S(b_source) exp(b_source ADC_source)``, exact for a two-point ADC map.
* The new trace is the source trace times ``r = S(b_new) / S(b_source)``.  That keeps the
  scan's own noise texture but scales it by ``r < 1``; the acquisition's noise level ``sigma``
  (estimated from the source trace, :func:`trace_noise_sigma`) is restored by adding complex
  Gaussian noise of ``sigma sqrt(1 - r^2)`` and taking the magnitude (Rician), as a scanner
  would: the same receiver noise on a weaker signal.
* The new ADC is what the scanner computes from ``S0`` and the noisy new trace,
  ``ln(S0 / S(b_new)) / b_new``, clipped to 0-4000 x 1e-6 mm2/s.

Only ``b_new >= b_source`` is supported: noise cannot be taken away.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from service.diffusion import BRAIN_KURTOSIS, diffusivity_from_adc, kurtosis_map
from service.domain import DiffusionStudy
from service.preprocess import brain_mask

#: Mean diffusional kurtosis of brain tissue (grey and white matter about 0.6-1.0).
TISSUE_KURTOSIS = BRAIN_KURTOSIS
ADC_CLIP = (0.0, 4000.0)  # x 1e-6 mm2/s, as scanners store it


def trace_noise_sigma(study: DiffusionStudy) -> float:
    """The trace image's noise level, from pixel-to-neighbour differences inside the brain.

    The residual of a pixel against the mean of its 8 in-plane neighbours has variance
    ``sigma^2 (1 + 1/8)`` where the image is smooth; the median absolute residual is robust to
    edges.  Scanners often zero the background, so the brain is the only region that has noise.
    """
    dwi = study.dwi.voxels.astype(np.float64)
    kernel = np.ones((1, 3, 3)) / 8.0
    kernel[0, 1, 1] = 0.0
    residual = dwi - ndimage.convolve(dwi, kernel, mode="nearest")
    inside = brain_mask(study.dwi)
    if not inside.any():
        raise ValueError("no brain found in the trace image")
    mad = float(np.median(np.abs(residual[inside] - np.median(residual[inside]))))
    return 1.4826 * mad / np.sqrt(1.0 + 1.0 / 8.0)


def at_b_value(
    study: DiffusionStudy,
    b_new: float,
    rng: np.random.Generator,
    *,
    tissue_kurtosis: float = TISSUE_KURTOSIS,
    sigma: float | None = None,
) -> DiffusionStudy:
    """``study`` as acquired at ``b_new`` (module docstring); a new study, the source untouched."""
    b_source = float(study.b_value)
    if b_new < b_source:
        raise ValueError(f"b={b_new:g} is below the source's b={b_source:g}: noise cannot be removed")
    trace = study.dwi.voxels.astype(np.float64)
    adc = np.clip(study.adc.voxels.astype(np.float64), *ADC_CLIP) * 1e-6
    d = diffusivity_from_adc(adc, b_source, tissue_kurtosis)
    k = kurtosis_map(d, tissue_kurtosis)
    log_ratio = -(b_new - b_source) * d + (b_new**2 - b_source**2) * d**2 * k / 6.0
    ratio = np.exp(np.minimum(log_ratio, 0.0))
    s0 = trace * np.exp(b_source * adc)
    sigma = trace_noise_sigma(study) if sigma is None else sigma
    added = sigma * np.sqrt(np.clip(1.0 - ratio**2, 0.0, 1.0))
    real = trace * ratio + added * rng.standard_normal(trace.shape)
    imaginary = added * rng.standard_normal(trace.shape)
    trace_new = np.hypot(real, imaginary)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc_new = np.log(s0 / trace_new) / b_new
    adc_new = np.where(np.isfinite(adc_new), adc_new * 1e6, ADC_CLIP[1])
    adc_new = np.where(trace > 0, adc_new, 0.0)  # the scanner's zeroed background stays zero
    notes = (*study.notes, f"simulated b={b_new:g} from b={b_source:g} (kurtosis {tissue_kurtosis:g}, noise sigma {sigma:.3g})")
    return dataclasses.replace(
        study,
        dwi=study.dwi.with_voxels(trace_new.astype(np.float32)),
        adc=study.adc.with_voxels(np.clip(adc_new, *ADC_CLIP).astype(np.float32)),
        b_value=float(b_new),
        notes=notes,
    )


__all__ = ["TISSUE_KURTOSIS", "at_b_value", "trace_noise_sigma"]
