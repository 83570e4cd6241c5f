"""ADC values in 1e-6 mm2/s: the scanner's map with its units, or one computed from b0 and trace.

Scanner ADC maps come in several units (1e-6 mm2/s on most, 1e-3 mm2/s or
mm2/s as floats through a rescale slope on others) and Philips also states
them in a Real World Value Mapping.  A declared unit is used when present and
checked against tissue values; otherwise the unit is inferred from them
(brain parenchyma is ~600-1000 x 1e-6 mm2/s, so the median of the non-zero
voxels of a head map falls in a different decade for each unit).  Values
implausible in every unit are a refusal, never a guess.

When the scanner sent no ADC map, ``ADC = -ln(S_b / S_0) / b`` from the b0
and the high-b trace image, with the background (where S_0 is below five
times the noise level, as scanners do) set to zero and values clipped to
[0, 5000] x 1e-6 mm2/s.  When only directional high-b images came, the trace
is their geometric mean, which is exact for a mono-exponential signal when
the directions are balanced (mean of g g^T equal to I/3, e.g. three
orthogonal directions).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from service.errors import StudyRefused

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]

#: Plausible median of the non-zero voxels of a head ADC map, 1e-6 mm2/s.
PLAUSIBLE_MEDIAN_MICRO = (100.0, 5000.0)
#: Plausible median of a computed ADC over the voxels with signal on b0 (scalp, brain
#: and CSF: about 700-1100 on healthy heads at 1.5 and 3 T), 1e-6 mm2/s.
PLAUSIBLE_COMPUTED_MEDIAN_MICRO = (300.0, 2500.0)
ADC_MAX_MICRO = 5000.0
#: Background: S_0 below this many noise standard deviations.
BACKGROUND_SIGMAS = 5.0
#: Directions are balanced when mean(g g^T) is within this of I/3 (each element).
BALANCE_TOLERANCE = 0.05


def adc_to_micro(adc: Array) -> tuple[Array, str]:
    """Bring an ADC map of unknown unit to 1e-6 mm2/s, inferring the unit from tissue values."""
    values = adc[adc > 0]
    if values.size == 0:
        raise StudyRefused("ADC map is empty (no positive values)")
    median = float(np.median(values))
    if 100.0 <= median <= 5000.0:
        return adc, "1e-6 mm2/s (inferred)"
    if 0.1 <= median <= 5.0:
        return adc * 1000.0, "1e-3 mm2/s (inferred)"
    if 1e-4 <= median <= 5e-3:
        return adc * 1e6, "mm2/s (inferred)"
    if 5000.0 < median <= 50000.0:
        return adc / 10.0, "1e-7 mm2/s (inferred)"
    raise StudyRefused(f"ADC map values in unknown units (median {median:.3g})")


def check_declared_unit(adc_micro: Array, unit: str) -> None:
    """Refuse a map whose declared unit gives tissue values no brain has."""
    values = adc_micro[adc_micro > 0]
    if values.size == 0:
        raise StudyRefused("ADC map is empty (no positive values)")
    median = float(np.median(values))
    low, high = PLAUSIBLE_MEDIAN_MICRO
    if not low <= median <= high:
        raise StudyRefused(
            f"ADC map implausible in its declared unit {unit} "
            f"(median {median:.3g} x 1e-6 mm2/s)"
        )


def noise_sigma(s0: Array) -> float:
    """Noise standard deviation of a magnitude image from its background.

    Background voxels of a magnitude image are Rayleigh distributed, whose
    mode is sigma: the peak of the histogram below half the Otsu head
    threshold.  Returns 0 when there is too little background to tell (e.g.
    zero-filled background), so that nothing but S_0 <= 0 is masked then.
    """
    positive = s0[s0 > 0]
    if positive.size < 1000:
        return 0.0
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    otsu.Execute(sitk.GetImageFromArray(positive.astype(np.float32).reshape(1, 1, -1)))
    ceiling = 0.5 * float(otsu.GetThreshold())
    background = positive[positive < ceiling]
    if background.size < 1000 or ceiling <= 0:
        return 0.0
    counts, edges = np.histogram(background, bins=64, range=(0.0, ceiling))
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), 1.5)
    i = int(np.argmax(smooth))
    if i == 0:
        return 0.0  # no Rayleigh peak: background is (nearly) zero-filled
    return float((edges[i] + edges[i + 1]) / 2.0)


def computed_adc(s0: Array, sb: Array, b_value: float) -> tuple[Array, float]:
    """ADC (1e-6 mm2/s) from b0 and high-b trace on one grid; also the noise sigma used."""
    sigma = noise_sigma(s0)
    threshold = max(BACKGROUND_SIGMAS * sigma, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = -np.log(np.maximum(sb, 1e-6) / np.maximum(s0, 1e-6)) / np.float32(b_value) * 1e6
    adc = np.clip(np.nan_to_num(adc, nan=0.0), 0.0, ADC_MAX_MICRO)
    adc[(s0 <= 0) | (s0 < threshold)] = 0.0
    return adc.astype(np.float32), sigma


def check_computed_adc(adc: Array, s0: Array, sigma: float) -> float:
    """Refuse a computed ADC that no head has; returns its median over the voxels with signal.

    The scanner-ADC path checks units and ranges; a computed map needs the
    same scrutiny: a median of 0 means the "b0" was not brighter than the
    b > 0 image (wrong pairing, wrong b-value), a very high one that the
    high-b image has almost no signal.  Either way the number would be wrong.
    """
    head = (s0 > 0) & (s0 >= BACKGROUND_SIGMAS * sigma)
    if int(head.sum()) < 100:
        raise StudyRefused("computed ADC: the b0 images have almost no signal above the noise")
    median = float(np.median(adc[head]))
    low, high = PLAUSIBLE_COMPUTED_MEDIAN_MICRO
    if not low <= median <= high:
        raise StudyRefused(
            f"computed ADC implausible: median {median:.0f} x 1e-6 mm2/s inside the head, "
            f"expected {low:.0f}-{high:.0f}; the b0 and b > 0 images may not belong together "
            "or the b-value may be wrong"
        )
    return median


def balanced_directions(directions: Sequence[Sequence[float]]) -> bool:
    """Whether the geometric mean over these gradient directions is the trace image."""
    if len(directions) < 3:
        return False
    g = np.asarray(directions, dtype=np.float64)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    tensor = np.einsum("ni,nj->ij", g, g) / len(g)
    return bool(np.abs(tensor - np.eye(3) / 3.0).max() <= BALANCE_TOLERANCE)


#: Fewest non-collinear gradient directions a tensor fit needs (6 tensor elements).
MIN_TENSOR_DIRECTIONS = 6


def tensor_rank(directions: Sequence[Sequence[float]]) -> int:
    """Rank of the tensor design of these directions (6 = the diffusion tensor is determined)."""
    g = np.asarray(directions, dtype=np.float64)
    if g.size == 0:
        return 0
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    design = np.column_stack([g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2,
                              2 * g[:, 0] * g[:, 1], 2 * g[:, 0] * g[:, 2], 2 * g[:, 1] * g[:, 2]])
    return int(np.linalg.matrix_rank(design, tol=1e-6))


def tensor_trace(
    directional: Sequence[Array], directions: Sequence[Sequence[float]], b_value: float,
    b0: Sequence[Array] = (),
) -> Array:
    """Trace-weighted image S0 exp(-b MD) from a log-linear diffusion-tensor fit.

    ``ln S = ln S0 - b g^T D g`` for each directional image, ``ln S = ln S0``
    for each b0; least squares for ``ln S0`` and the six elements of D, then
    the mean diffusivity MD = trace(D) / 3.  For balanced directions this is
    the geometric mean; for unbalanced ones (any 6 or more non-collinear
    directions with a b0, or 7 without) it is still the trace, where the
    geometric mean would be biased by the fibre orientation.  Zero where any
    image is zero (no signal).
    """
    g = np.asarray(directions, dtype=np.float64)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    b = float(b_value)
    rows = [[1.0, -b * x * x, -b * y * y, -b * z * z, -2 * b * x * y, -2 * b * x * z, -2 * b * y * z]
            for x, y, z in g]
    rows += [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * len(b0)
    design = np.asarray(rows)
    if np.linalg.matrix_rank(design, tol=1e-9) < 7:
        raise ValueError("directions do not determine the tensor")
    stack = np.stack([*directional, *b0]).astype(np.float64)
    shape = stack.shape[1:]
    positive = np.all(stack > 0, axis=0)
    logs = np.log(np.where(stack > 0, stack, 1.0)).reshape(len(stack), -1)
    coefficients = np.linalg.pinv(design) @ logs
    mean_diffusivity = coefficients[1:4].sum(axis=0) / 3.0
    trace = np.exp(coefficients[0] - b * mean_diffusivity).reshape(shape)
    return np.where(positive, trace, 0.0).astype(np.float32)


def geometric_mean(images: Sequence[Array]) -> Array:
    """Voxel-wise geometric mean; zero where any image is zero (no signal)."""
    stack = np.stack(images).astype(np.float64)
    positive = np.all(stack > 0, axis=0)
    with np.errstate(divide="ignore"):
        logs = np.log(np.where(stack > 0, stack, 1.0))
    mean = np.exp(logs.mean(axis=0))
    return np.where(positive, mean, 0.0).astype(np.float32)
