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


# --------------------------------------------------------------------------
# Scanner-domain signal effects (used only when a phantom is drawn for a
# :class:`models.synth.domains.ScannerDomain`; the default path never calls them).

#: Echo time (ms) at which :func:`random_tissue_parameters`' relative S0 values hold.
REFERENCE_ECHO_TIME_MS = 80.0

#: T2 (ms) of GM, WM, CSF and the scalp's residual (muscle) signal by field
#: strength (Stanisz et al., MRM 2005; CSF ~2 s).  Only differences from the
#: reference echo time matter, so round literature values are enough.
T2_MS: dict[float, tuple[float, float, float, float]] = {
    1.5: (95.0, 72.0, 2000.0, 44.0),
    3.0: (99.0, 69.0, 1800.0, 50.0),
}


def at_echo_time(
    params: TissueParameters, echo_time_ms: float, field_strength_t: float
) -> TissueParameters:
    """``params`` re-weighted for ``echo_time_ms``: S0 *= exp(-(TE - TE_ref) / T2).

    A longer TE (typical of 1.5 T and of weaker gradients) darkens parenchyma
    more than CSF, so the b0 and the T2 part of the b1000 image change their
    tissue contrast; the ADC itself does not depend on TE.
    """
    t2 = T2_MS[float(field_strength_t)]
    delta = float(echo_time_ms) - REFERENCE_ECHO_TIME_MS
    s0 = tuple(float(s * np.exp(-delta / t)) for s, t in zip(params.s0, t2, strict=True))
    return TissueParameters(s0=s0, adc=params.adc)  # type: ignore[arg-type]


def shine_through_at_echo_time(
    s0_increase: npt.NDArray[np.float32], echo_time_ms: float
) -> npt.NDArray[np.float32]:
    """Lesion S0 increase at ``echo_time_ms`` given its value at the reference TE.

    The lesion/parenchyma S0 ratio is ``exp(TE * (1/T2_par - 1/T2_lesion))``,
    so its logarithm scales with TE: ``(1 + inc) ** (TE / TE_ref) - 1``.  This
    is why T2 shine-through is stronger on a long-TE 1.5 T protocol.
    """
    exponent = np.float32(float(echo_time_ms) / REFERENCE_ECHO_TIME_MS)
    return np.asarray(np.power(1.0 + s0_increase, exponent) - 1.0, dtype=np.float32)


def kspace_transfer(
    shape: tuple[int, int],
    acquired_matrix: int,
    *,
    fermi_radius: float | None = None,
    fermi_width: float = 0.05,
) -> npt.NDArray[np.float32]:
    """In-plane k-space transfer function (``np.fft.fftfreq`` order) of one EPI slice.

    Only the central ``acquired_matrix`` lines and samples are acquired; the
    rest is zero-filled up to the reconstructed ``shape`` (GE "ZIP", Philips
    reconstruction matrix), so the image is an interpolation of a coarser
    acquisition.  ``fermi_radius`` (fraction of the acquired k_max) adds the
    radial Fermi apodisation vendors use against Gibbs ringing; ``None`` is a
    plain rectangular window (and all-ones when nothing is zero-filled).
    """
    rows, cols = shape
    half = min(acquired_matrix, rows, cols) / 2.0
    ky = np.fft.fftfreq(rows) * rows
    kx = np.fft.fftfreq(cols) * cols
    inside = ((ky >= -half) & (ky < half))[:, None] & ((kx >= -half) & (kx < half))[None, :]
    transfer = inside.astype(np.float64)
    if fermi_radius is not None:
        radius = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) / half
        transfer /= 1.0 + np.exp((radius - fermi_radius) / fermi_width)
    return transfer.astype(np.float32)


def rician_acquired(
    rng: np.random.Generator,
    signal: npt.NDArray[np.float32],
    sigma: float,
    transfer: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """Magnitude image of ``signal`` + complex noise after the k-space ``transfer``.

    The noise is white before the transfer and scaled so that the *output*
    pixel noise has std ``sigma`` (what a background measurement sees), while
    the signal is blurred to the acquired resolution and the noise becomes
    spatially correlated, as in a zero-filled, apodised reconstruction.
    """
    noise_gain = float(np.sqrt(np.mean(transfer.astype(np.float64) ** 2)))
    scale = np.float32(sigma / max(noise_gain, 1e-6))
    image = signal + rng.standard_normal(signal.shape, dtype=np.float32) * scale
    image = image + 1j * (rng.standard_normal(signal.shape, dtype=np.float32) * scale)
    kspace = np.fft.fft2(image.astype(np.complex64), axes=(-2, -1))
    kspace *= transfer
    return np.abs(np.fft.ifft2(kspace, axes=(-2, -1))).astype(np.float32)
