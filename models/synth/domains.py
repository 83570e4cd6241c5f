"""Scanner domains: three phantom "sites" that differ the way real scanners do.

Cross-vendor stroke segmentation papers (Alis et al. 2020: Dice 0.86 on the
vendor a model was trained on, 0.73-0.76 on another vendor, 0.83-0.85 after
fine-tuning on ~10 % of the target vendor's cases) need a dataset in which a
model trained on one scanner meets a *different* scanner.  A
:class:`ScannerDomain` is one such scanner and protocol; passing it to
:func:`models.synth.phantom.generate_phantom` draws the acquisition, noise,
bias field and contrast from its ranges instead of the mixed default ones.

The differences are chosen to survive the service's default preprocessing
(``dwi-median-adc-fixed-v1``: DWI divided by the head's median, ADC at a fixed
scale, each slice resampled to 128 x 128 at 1.8 mm, native slices kept), so a
global intensity scale alone would be normalised away.  What stays is SNR,
resolution and blur, slice thickness, bias field, tissue and lesion contrast
(echo time, effective b-value) and the ADC calibration:

=======================  =================  =================  =================
parameter                A: Siemens-like    B: GE-like         C: Philips-like
=======================  =================  =================  =================
DICOM convention         siemens_classic    ge                 philips
field strength           3.0 T              1.5 T              3.0 T
reconstructed matrix     192                256                160
acquired matrix          192                128                112 or 128
k-space apodisation      none               Fermi r = 0.85     Fermi r = 0.92
field of view (mm)       220, 230           240                230, 240
pixel spacing (mm)       1.15-1.20          0.94               1.44-1.50
slice thickness + gap    4.0 + 0.8/1.2 mm   5.0 + 1.0/1.5 mm   3.0 + 0/0.3 mm
slices                   26-36              20-28              42-56
SNR of WM on b0          40-60              16-24              24-34
WM b0 stored value       250-400            700-900            450-650
bias field amplitude     0.15-0.25          0.04-0.10          0.08-0.15
echo time (ms)           55-68              88-105             68-80
effective / nominal b    0.99-1.01          0.955-0.975        1.025-1.045
repetition time (ms)     5000-7000          7000-9000          3500-5000
averages (NEX)           1, 2               1                  2
=======================  =================  =================  =================

Why each differs on real scanners:

* *convention*: how each vendor labels b-values and stores the ADC
  (:mod:`models.synth.vendors`; Philips appends the ADC to the DWI series,
  stored x2 with a RescaleSlope); intake must read all three identically.
* *field strength, SNR*: signal grows roughly with B0; head-coil channels,
  averages, parallel-imaging g-factor and voxel size set the rest.  SNR is
  the per-pixel WM b0 signal over the noise sigma of a *stored* pixel (what
  the background shows), so B (1.5 T, one average) is the noisiest.
* *acquired vs reconstructed matrix, apodisation*: GE zero-fills ("ZIP") a
  128 acquisition to 256 and Philips reconstructs ~1.8-2 mm acquired voxels
  on a finer grid, both with a Fermi filter against Gibbs ringing: the image
  is blurred and its noise spatially correlated.  Siemens' interpolation is
  off: sharp, white noise.
* *slice thickness and gap*: thick, gapped 1.5 T slices vs thin contiguous
  3 T slices change the partial volume of small and infratentorial lesions.
* *stored value scale*: vendor image scaling; normalised away by the median
  profile but not by window-based profiles (``alis-window-v1``).
* *bias field*: B1 inhomogeneity grows with field strength; GE PURE and
  Philips CLEAR intensity correction leave less residual shading.
* *echo time*: gradient strength and partial Fourier set TE; a longer TE
  weights T2 more (:func:`models.synth.diffusion.at_echo_time`), so lesion
  T2 shine-through on the b1000 image is stronger (measured lesion/WM b1000
  ratio on one medium lesion: A 1.59, B 1.84, C 1.69).
* *effective / nominal b*: gradient calibration and imaging-gradient cross
  terms make the applied b differ from the 1000 in the header by a few per
  cent; the scanner computes the ADC with the nominal b, so its ADC map is
  scaled by this factor (B reads ~3.5 % low, C ~3.5 % high) and the DWI
  contrast moves with it.
* *TR, averages*: header values only (their SNR effect is in the SNR range).

Measured on four medium-lesion phantoms (seeds 431-443) imaged on each
domain: background noise sigma matches the drawn sigma within 2 %; WM b0
SNR A 50-61, B 20-23, C 29-35 (b1000: A 25-30, B 10-12, C 14-17); WM ADC
relative to A: B 0.95-0.98, C 1.03-1.04; noise lag-1 correlation A ~0,
B > 0.4.  The bundled ``unet2d-phantom`` (trained on the mixed default
phantoms, which span most of these SNRs) keeps Dice 0.90-0.94 on all three, so the
gap of the cross-vendor experiment must come from training on one domain.

Not modelled: EPI N/2 ghosts, susceptibility distortion, spatially varying
(g-factor) noise, gradient non-linearity across the field of view, intensity
non-linearities in vendor reconstructions.

Lesions are drawn exactly as in the default generator
(:data:`models.synth.lesions.CLASS_PROBABILITIES`: 30 % small < 1.7 mL, 35 %
medium 1.7-14 mL, 25 % large > 14 mL, 10 % none; each lesion <= 14 mL is
infratentorial with probability 0.25, split lesions add further small ones),
which already keeps small lesions well represented and infratentorial sites
present (over 600 drawn cases: 44 % of lesions < 1.7 mL, 19 % of lesions and
24 % of cases infratentorial), so a domain has no lesion mix of its own.  Consequence: the same seed
gives the same head, pose and lesions in every domain (a paired design, the
same patient on three scanners; UIDs differ per domain), while
:func:`models.synth.cases.write_phantom_cases` with a domain derives per-domain
case seeds, so datasets of different domains hold different patients.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TypedDict

import numpy as np

logger = logging.getLogger(__name__)

Range = tuple[float, float]


class GeometryChoices(TypedDict):
    """Protocol keywords of :func:`models.synth.geometry.random_scan_geometry`."""

    matrix_choices: tuple[int, ...]
    fov_choices: tuple[float, ...]
    thickness_choices: tuple[float, ...]
    gap_choices: tuple[float, ...]
    slice_count_range: tuple[int, int]


def _check_range(name: str, value: Range, *, positive: bool = True) -> None:
    lo, hi = value
    if not lo <= hi:
        raise ValueError(f"{name}: low {lo} exceeds high {hi}")
    if positive and lo <= 0:
        raise ValueError(f"{name}: values must be positive, got {value}")


def _check_choices(name: str, value: tuple[float, ...], *, allow_zero: bool = False) -> None:
    if not value:
        raise ValueError(f"{name}: needs at least one choice")
    if any(v < 0 or (v == 0 and not allow_zero) for v in value):
        raise ValueError(f"{name}: choices must be positive, got {value}")


@dataclass(frozen=True, slots=True)
class ScannerSettings:
    """The scanner settings drawn from a :class:`ScannerDomain` for one phantom.

    Recorded in the phantom (and its truth.json), so every case says exactly
    which SNR, ADC scaling and resolution it was made with.
    """

    domain: str
    field_strength_t: float
    acquired_matrix: int
    fermi_radius: float | None
    echo_time_ms: float
    repetition_time_ms: float
    number_of_averages: float
    snr_wm_b0: float
    wm_b0_stored: float
    bias_amplitude: float
    b_value_scale: float

    def as_record(self) -> dict[str, float | int | str | None]:
        """Plain JSON-able values, for truth.json."""
        return dict(asdict(self))


@dataclass(frozen=True, slots=True)
class ScannerDomain:
    """One scanner and stroke DWI protocol: choice lists and ranges to draw cases from.

    Validated on construction, so a domain that exists can be drawn from.
    ``convention`` is a :class:`models.synth.vendors.VendorConvention` value
    (kept as a string: the vendor module imports the generator, not the other
    way round).  Ranges are (low, high) for uniform draws.
    """

    name: str
    manufacturer: str
    convention: str
    description: str
    field_strength_t: float
    matrix_choices: tuple[int, ...]
    acquired_matrix_choices: tuple[int, ...]
    fermi_radius: float | None
    fov_mm_choices: tuple[float, ...]
    slice_thickness_mm_choices: tuple[float, ...]
    slice_gap_mm_choices: tuple[float, ...]
    slice_count_range: tuple[int, int]
    snr_wm_b0_range: Range
    wm_b0_stored_range: Range
    bias_amplitude_range: Range
    b_value_scale_range: Range
    echo_time_ms_range: Range
    repetition_time_ms_range: Range
    number_of_averages_choices: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.name or not self.manufacturer or not self.convention:
            raise ValueError("a scanner domain needs a name, a manufacturer and a convention")
        if self.field_strength_t not in (1.5, 3.0):
            raise ValueError(f"domain {self.name}: field strength must be 1.5 or 3.0 T")
        _check_choices("matrix_choices", tuple(float(m) for m in self.matrix_choices))
        _check_choices(
            "acquired_matrix_choices", tuple(float(m) for m in self.acquired_matrix_choices)
        )
        _check_choices("fov_mm_choices", self.fov_mm_choices)
        _check_choices("slice_thickness_mm_choices", self.slice_thickness_mm_choices)
        _check_choices("slice_gap_mm_choices", self.slice_gap_mm_choices, allow_zero=True)
        _check_choices("number_of_averages_choices", self.number_of_averages_choices)
        lo, hi = self.slice_count_range
        if not 8 <= lo <= hi:
            raise ValueError(f"domain {self.name}: slice_count_range {self.slice_count_range}")
        if self.fermi_radius is not None and not 0.3 <= self.fermi_radius <= 1.5:
            raise ValueError(f"domain {self.name}: fermi_radius {self.fermi_radius}")
        for name in ("snr_wm_b0_range", "wm_b0_stored_range", "bias_amplitude_range",
                     "b_value_scale_range", "echo_time_ms_range", "repetition_time_ms_range"):
            _check_range(f"domain {self.name}: {name}", getattr(self, name))
        b_lo, b_hi = self.b_value_scale_range
        if not (0.8 <= b_lo and b_hi <= 1.2):
            raise ValueError(f"domain {self.name}: b_value_scale beyond +-20 % is not a scanner")
        if self.bias_amplitude_range[1] >= 0.5:
            raise ValueError(f"domain {self.name}: bias field amplitude must stay below 0.5")

    def geometry_choices(self) -> GeometryChoices:
        """Keyword arguments of :func:`models.synth.geometry.random_scan_geometry`."""
        return {
            "matrix_choices": self.matrix_choices,
            "fov_choices": self.fov_mm_choices,
            "thickness_choices": self.slice_thickness_mm_choices,
            "gap_choices": self.slice_gap_mm_choices,
            "slice_count_range": self.slice_count_range,
        }

    def draw(self, rng: np.random.Generator, *, reconstructed_matrix: int) -> ScannerSettings:
        """The settings of one case; the acquired matrix never exceeds the reconstructed one."""
        def uniform(r: Range, digits: int) -> float:
            return float(round(rng.uniform(r[0], r[1]), digits))

        acquired = int(rng.choice(self.acquired_matrix_choices))
        return ScannerSettings(
            domain=self.name,
            field_strength_t=self.field_strength_t,
            acquired_matrix=min(acquired, int(reconstructed_matrix)),
            fermi_radius=self.fermi_radius,
            echo_time_ms=uniform(self.echo_time_ms_range, 1),
            repetition_time_ms=uniform(self.repetition_time_ms_range, 0),
            number_of_averages=float(rng.choice(self.number_of_averages_choices)),
            snr_wm_b0=uniform(self.snr_wm_b0_range, 3),
            wm_b0_stored=uniform(self.wm_b0_stored_range, 3),
            bias_amplitude=uniform(self.bias_amplitude_range, 4),
            b_value_scale=uniform(self.b_value_scale_range, 4),
        )


DOMAINS: dict[str, ScannerDomain] = {
    "A": ScannerDomain(
        name="A",
        manufacturer="SIEMENS",
        convention="siemens_classic",
        description="Siemens-like 3 T: 192 matrix without interpolation, 4 mm slices, high SNR, "
        "short TE, strong B1 shading, reference ADC calibration",
        field_strength_t=3.0,
        matrix_choices=(192,),
        acquired_matrix_choices=(192,),
        fermi_radius=None,
        fov_mm_choices=(220.0, 230.0),
        slice_thickness_mm_choices=(4.0,),
        slice_gap_mm_choices=(0.8, 1.2),
        slice_count_range=(26, 36),
        snr_wm_b0_range=(40.0, 60.0),
        wm_b0_stored_range=(250.0, 400.0),
        bias_amplitude_range=(0.15, 0.25),
        b_value_scale_range=(0.99, 1.01),
        echo_time_ms_range=(55.0, 68.0),
        repetition_time_ms_range=(5000.0, 7000.0),
        number_of_averages_choices=(1.0, 2.0),
    ),
    "B": ScannerDomain(
        name="B",
        manufacturer="GE MEDICAL SYSTEMS",
        convention="ge",
        description="GE-like 1.5 T: 128 acquired, zero-filled to 256 with a Fermi filter, "
        "5 mm slices with 1-1.5 mm gaps, low SNR, long TE, flat intensity, ADC ~3.5 % low",
        field_strength_t=1.5,
        matrix_choices=(256,),
        acquired_matrix_choices=(128,),
        fermi_radius=0.85,
        fov_mm_choices=(240.0,),
        slice_thickness_mm_choices=(5.0,),
        slice_gap_mm_choices=(1.0, 1.5),
        slice_count_range=(20, 28),
        snr_wm_b0_range=(16.0, 24.0),
        wm_b0_stored_range=(700.0, 900.0),
        bias_amplitude_range=(0.04, 0.10),
        b_value_scale_range=(0.955, 0.975),
        echo_time_ms_range=(88.0, 105.0),
        repetition_time_ms_range=(7000.0, 9000.0),
        number_of_averages_choices=(1.0,),
    ),
    "C": ScannerDomain(
        name="C",
        manufacturer="Philips Medical Systems",
        convention="philips",
        description="Philips-like 3 T: ~1.8-2 mm acquired, reconstructed at 160, thin "
        "contiguous 3 mm slices, medium SNR, ADC ~3.5 % high, ADC stored x2",
        field_strength_t=3.0,
        matrix_choices=(160,),
        acquired_matrix_choices=(112, 128),
        fermi_radius=0.92,
        fov_mm_choices=(230.0, 240.0),
        slice_thickness_mm_choices=(3.0,),
        slice_gap_mm_choices=(0.0, 0.3),
        slice_count_range=(42, 56),
        snr_wm_b0_range=(24.0, 34.0),
        wm_b0_stored_range=(450.0, 650.0),
        bias_amplitude_range=(0.08, 0.15),
        b_value_scale_range=(1.025, 1.045),
        echo_time_ms_range=(68.0, 80.0),
        repetition_time_ms_range=(3500.0, 5000.0),
        number_of_averages_choices=(2.0,),
    ),
}


def get_domain(name: ScannerDomain | str) -> ScannerDomain:
    """The domain called ``name`` (case-insensitive); a domain is returned as is."""
    if isinstance(name, ScannerDomain):
        return name
    try:
        return DOMAINS[str(name).strip().upper()]
    except KeyError:
        valid = ", ".join(repr(k) for k in DOMAINS)
        raise ValueError(f"unknown scanner domain {name!r}; valid domains: {valid}") from None
