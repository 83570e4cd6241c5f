"""Named intensity profiles: how a study's DWI and ADC become network input values.

A model card names the profile its model was trained with; the service applies
exactly that profile (``ModelCard.preprocessing_profile``).  Profiles work on
the native grid, before resampling to the model grid.

* ``dwi-median-adc-fixed-v1``: DWI divided by the median head signal; ADC in
  1e-3 mm2/s.  Fast and vendor-agnostic; the bundled phantom model uses it.
* ``noh-n4-histpeak-v1`` (Noh et al. 2023): Gaussian blur + Otsu skull strip,
  SimpleITK N4 bias correction (<= 10 iterations, shrunk in-plane for speed,
  field applied at full resolution), per-slice histogram-peak normalisation
  (peak -> 150, clipped at 255), scaled to 0..1; ADC as above, masked.
* ``alis-window-v1`` (Alis et al. 2020): per-vendor windows for DWI and ADC,
  selected by Manufacturer from a site-editable table
  (:class:`VendorWindows`), mapped to 0..1.

Each profile also exists as a ``b1000eq-`` variant (``b1000eq-median-adc-fixed-v2``,
``noh-b1000eq-n4-histpeak-v2``, ``alis-b1000eq-window-v2``) that first turns the
acquired trace into a b=1000-equivalent one (:func:`b1000_equivalent`), so the
network always sees the contrast it was trained on whatever b the scanner used:
on real healthy scans the phantom-trained model's false-positive volume grew with
b (b=1500: 115-122 mL; b=2500: 371-591 mL), because a higher b darkens normal
tissue and leaves every bright structure relatively brighter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from service.diffusion import B1000_TOLERANCE, REFERENCE_B_VALUE, adc_at_b
from service.domain import DiffusionStudy, ImageVolume
from service.imaging import as_sitk

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
DEFAULT_PROFILE = "dwi-median-adc-fixed-v1"


@dataclass(frozen=True, slots=True)
class Window:
    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"window high must exceed low: {self}")

    def apply(self, values: Array) -> Array:
        scaled: Array = np.clip((values - self.low) / (self.high - self.low), 0.0, 1.0).astype(np.float32)
        return scaled


@dataclass(frozen=True, slots=True)
class VendorWindow:
    dwi: Window
    adc: Window  # in 1e-6 mm2/s


@dataclass(frozen=True, slots=True)
class VendorWindows:
    """DWI/ADC windows per Manufacturer (case-insensitive prefix match), with a default."""

    by_manufacturer: Mapping[str, VendorWindow] = field(default_factory=dict)
    default: VendorWindow = VendorWindow(dwi=Window(0.0, 1500.0), adc=Window(0.0, 3000.0))

    def for_manufacturer(self, manufacturer: str) -> VendorWindow:
        key = manufacturer.strip().upper()
        for name, window in self.by_manufacturer.items():
            if key.startswith(name.strip().upper()):
                return window
        return self.default


@dataclass(frozen=True, slots=True)
class ProfileOptions:
    """Site settings a profile may use."""

    vendor_windows: VendorWindows = VendorWindows()


Profile = Callable[[DiffusionStudy, ProfileOptions], tuple[Array, Array]]


# -- dwi-median-adc-fixed-v1 -------------------------------------------------------

def _foreground_median(dwi: Array) -> float:
    """Median DWI signal of the head, robust to background noise and hot lesions."""
    positive = dwi[dwi > 0]
    if positive.size == 0:
        return 1.0
    high = float(np.percentile(positive, 99.5))
    foreground = positive[positive > 0.15 * high]
    return float(np.median(foreground)) if foreground.size else 1.0


def _adc_fixed(adc: Array) -> Array:
    scaled: Array = np.clip(adc / 1000.0, 0.0, 4.0).astype(np.float32)
    return scaled


def dwi_median_adc_fixed_v1(study: DiffusionStudy, options: ProfileOptions) -> tuple[Array, Array]:
    """DWI / median head signal (clip 0..8); ADC in 1e-3 mm2/s (clip 0..4)."""
    dwi = study.dwi.voxels
    dwi_n = np.clip(dwi / max(_foreground_median(dwi), 1e-6), 0.0, 8.0).astype(np.float32)
    return dwi_n, _adc_fixed(study.adc.voxels)


# -- noh-n4-histpeak-v1 --------------------------------------------------------------

def brain_mask(dwi: ImageVolume, *, blur_mm: float = 2.0, erode_voxels: int = 1) -> npt.NDArray[np.bool_]:
    """Gaussian blur + Otsu on the high-b DWI, largest component, holes filled, eroded.

    ``sitk.OtsuThreshold(img)`` labels the *background* 1; passing
    (inside=0, outside=1) gives 1 above the threshold, i.e. the head.
    """
    image = sitk.Cast(as_sitk(dwi), sitk.sitkFloat32)
    blurred = sitk.SmoothingRecursiveGaussian(image, blur_mm)
    head = sitk.GetArrayFromImage(sitk.OtsuThreshold(blurred, 0, 1, 200)).astype(bool)
    labels, n = ndimage.label(head)
    if n == 0:
        return head
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # voxels per component (ndimage.sum
    # with one index per component took ~60 ms on noisy heads with thousands of them)
    mask = labels == (int(np.argmax(sizes)) + 1)
    mask = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    if erode_voxels:
        structure = np.zeros((1, 3, 3), dtype=bool)
        structure[0] = ndimage.generate_binary_structure(2, 1)
        mask = np.asarray(ndimage.binary_erosion(mask, structure=structure, iterations=erode_voxels), dtype=bool)
    return np.asarray(mask, dtype=bool)


def n4_correct(dwi: ImageVolume, mask: npt.NDArray[np.bool_], *, iterations: int = 10,
               levels: int = 3, shrink: tuple[int, int, int] = (4, 4, 1)) -> Array:
    """N4 bias correction (<= ``iterations`` per fitting level), fitted shrunk, applied at full resolution.

    One level of 10 iterations barely moves a smooth field (measured on a
    phantom with a 30 % left-right field: 1.31 -> 1.25); three levels of 10
    remove it (-> 0.99) at ~1 s more.
    Shrinking in-plane dominates the speed (measured: 93 s unshrunk vs ~4 s at
    [4,4,1] for 256x256x30 on 2 cores); thick slices are not shrunk in z.
    N4 works in log space, so the image is offset to be >= 1.
    """
    image = sitk.Cast(as_sitk(dwi, (np.maximum(dwi.voxels, 0) + 1.0).astype(np.float32)), sitk.sitkFloat32)
    mask_image = sitk.Cast(as_sitk(dwi, mask.astype(np.float32)), sitk.sitkUInt8)
    small = sitk.Shrink(image, list(shrink))
    small_mask = sitk.Shrink(mask_image, list(shrink))
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([iterations] * levels)
    corrector.Execute(small, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(image)
    corrected = image / sitk.Exp(log_field)
    return (sitk.GetArrayFromImage(corrected) - 1.0).astype(np.float32)


def histogram_peak_normalise(dwi: Array, mask: npt.NDArray[np.bool_], *, peak_to: float = 150.0,
                             clip: float = 255.0, bins: int = 128) -> Array:
    """Scale each slice so its brain-histogram peak lands at ``peak_to``; clip at ``clip``."""
    out = np.zeros_like(dwi, dtype=np.float32)
    volume_values = dwi[mask]
    fallback = _histogram_peak(volume_values, bins) if volume_values.size else 1.0
    for k in range(dwi.shape[0]):
        values = dwi[k][mask[k]]
        peak = _histogram_peak(values, bins) if values.size >= 200 else fallback
        out[k] = np.clip(dwi[k] * (peak_to / max(peak, 1e-6)), 0.0, clip) * mask[k]
    return out


def _histogram_peak(values: Array, bins: int) -> float:
    high = float(np.percentile(values, 99.5))
    counts, edges = np.histogram(values, bins=bins, range=(0.0, max(high, 1e-6)))
    counts[0] = 0  # the skull-stripped background at zero is not tissue
    i = int(np.argmax(counts))
    return float((edges[i] + edges[i + 1]) / 2.0)


def noh_n4_histpeak_v1(study: DiffusionStudy, options: ProfileOptions) -> tuple[Array, Array]:
    mask = brain_mask(study.dwi)
    corrected = n4_correct(study.dwi, mask)
    dwi_n = histogram_peak_normalise(corrected, mask) / 255.0
    adc_n = _adc_fixed(study.adc.voxels) * mask
    return dwi_n.astype(np.float32), adc_n.astype(np.float32)


# -- alis-window-v1 ------------------------------------------------------------------

def alis_window_v1(study: DiffusionStudy, options: ProfileOptions) -> tuple[Array, Array]:
    window = options.vendor_windows.for_manufacturer(study.manufacturer)
    return window.dwi.apply(study.dwi.voxels), window.adc.apply(study.adc.voxels)


# -- b=1000-equivalent harmonisation ----------------------------------------------

#: The b-value every ``b1000eq-`` profile brings the trace to (s/mm2).
HARMONISED_B_VALUE = 1000.0
#: Free water at body temperature (1e-6 mm2/s); no tissue diffuses faster.
MAX_PHYSICAL_ADC = 3000.0


def b1000_equivalent(study: DiffusionStudy) -> ImageVolume:
    """The trace the scanner would have measured at b=1000: S_b exp((b - 1000) ADC).

    With S_b = S0 exp(-b ADC) this is S0 exp(-1000 ADC), computed from the
    acquired pair (trace and ADC on one grid) without needing S0 itself.  The
    ADC is clipped to 0..3000 x 1e-6 mm2/s (free water), so fluid whose
    high-b signal sits at the noise floor is not extrapolated into a bright
    artefact; a missing ADC (0) leaves the voxel as acquired.  At b=1000 this
    is the identity.
    """
    adc_mm2_s = np.clip(np.nan_to_num(study.adc.voxels, nan=0.0), 0.0, MAX_PHYSICAL_ADC) * 1e-6
    factor = np.exp((float(study.b_value) - HARMONISED_B_VALUE) * adc_mm2_s)
    return study.dwi.with_voxels((study.dwi.voxels * factor).astype(np.float32))


def b1000_equivalent_kurtosis(study: DiffusionStudy) -> DiffusionStudy:
    """The study as a b=1000 acquisition, kurtosis included: the trace *and* the ADC.

    :func:`b1000_equivalent` extrapolates with the ADC measured at the acquired b, which in
    tissue is lower than the b=1000 ADC (kurtosis, :mod:`service.diffusion`): at b=2500 normal
    brain's ADC falls by about 16 % and a lesion's by less, so a network trained at b=1000 sees
    a darker ADC map and a lower-contrast trace (measured: a 0.4 mL lesion on a real Canon scan
    re-derived at b=2500 peaked at probability 0.71 and was dropped).  Here each voxel's ADC
    is first brought to b=1000 (:func:`service.diffusion.adc_at_b`: ``ADC(b) = D - b D^2 K / 6``,
    K = 0.8 in tissue, 0 in CSF) and the trace follows from it: ``S_1000 = S_b exp(b ADC_b -
    1000 ADC_1000)``.  Both are clipped as in :func:`b1000_equivalent`.  Within 100 s/mm2 of
    b=1000 nothing changes: this is then :func:`b1000_equivalent` exactly.
    """
    b_value = float(study.b_value)
    adc_b = np.clip(np.nan_to_num(study.adc.voxels, nan=0.0), 0.0, MAX_PHYSICAL_ADC).astype(np.float64) * 1e-6
    if abs(b_value - REFERENCE_B_VALUE) <= B1000_TOLERANCE:
        adc_1000 = adc_b
    else:
        adc_1000 = np.clip(adc_at_b(adc_b, b_value, HARMONISED_B_VALUE), 0.0, MAX_PHYSICAL_ADC * 1e-6)
    factor = np.exp(b_value * adc_b - HARMONISED_B_VALUE * adc_1000)
    dwi = study.dwi.with_voxels((study.dwi.voxels * factor).astype(np.float32))
    if adc_1000 is adc_b:
        return replace(study, dwi=dwi)
    adc = study.adc.with_voxels((adc_1000 * 1e6).astype(np.float32))
    return replace(study, dwi=dwi, adc=adc)


def harmonised(profile: Profile) -> Profile:
    """``profile`` applied to the b=1000-equivalent trace of the study."""

    def run(study: DiffusionStudy, options: ProfileOptions) -> tuple[Array, Array]:
        return profile(replace(study, dwi=b1000_equivalent(study)), options)

    run.__doc__ = f"b=1000-equivalent trace, then {profile.__name__}."
    return run


def harmonised_kurtosis(profile: Profile) -> Profile:
    """``profile`` applied to the study brought to b=1000, trace and ADC (kurtosis-aware)."""

    def run(study: DiffusionStudy, options: ProfileOptions) -> tuple[Array, Array]:
        return profile(b1000_equivalent_kurtosis(study), options)

    run.__doc__ = f"b=1000-equivalent trace and ADC (kurtosis), then {profile.__name__}."
    return run


PROFILES: dict[str, Profile] = {
    DEFAULT_PROFILE: dwi_median_adc_fixed_v1,
    "noh-n4-histpeak-v1": noh_n4_histpeak_v1,
    "alis-window-v1": alis_window_v1,
    "b1000eq-median-adc-fixed-v2": harmonised(dwi_median_adc_fixed_v1),
    "noh-b1000eq-n4-histpeak-v2": harmonised(noh_n4_histpeak_v1),
    "alis-b1000eq-window-v2": harmonised(alis_window_v1),
    # v3: the ADC is brought to b=1000 too (kurtosis); identical to v2 within 100 s/mm2 of b=1000
    "b1000eq-median-adc-fixed-v3": harmonised_kurtosis(dwi_median_adc_fixed_v1),
    "noh-b1000eq-n4-histpeak-v3": harmonised_kurtosis(noh_n4_histpeak_v1),
    "alis-b1000eq-window-v3": harmonised_kurtosis(alis_window_v1),
}

#: Profiles whose network input is a b=1000-equivalent trace.
HARMONISING_PROFILES: frozenset[str] = frozenset(
    name for name in PROFILES if "b1000eq" in name
)
