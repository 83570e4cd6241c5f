"""Lesion mimics: what real diffusion scans show that is *not* an acute infarct.

A model trained on clean phantoms calls healthy real brains infarcted, because
real scans carry signal the phantoms lacked.  Each mimic here adds one such
appearance, physically plausibly, and never touches the truth (lesion fraction
and mask stay those of the acute lesions):

``cortical_ribbon``
    GM brighter than WM on the b1000 trace (GM/WM trace ratio 1.10-1.30 in
    pure tissue; GM ADC 0.80-0.90, WM 0.70-0.75 x 1e-3 mm2/s; GM/WM S0 <= 1.45).
``t2_shine_through``
    periventricular white-matter hyperintensities / old lesions: S0 +40-150 %,
    ADC 0.9-1.5e-3 (never below parenchyma), always brighter on b1000.
``susceptibility``
    EPI distortion along the phase-encode axis near the frontal sinus, the
    ethmoid / orbitofrontal region, the sphenoid (skull base) and the petrous
    bones: pile-up (x1.5-3) beside stretch and dephasing dropout, identical on
    b0 and b1000 (the ADC stays roughly normal).
``nyquist_ghost``
    N/2 ghost: a copy shifted by half the field of view along phase encode,
    2-8 % of the image, with its own amplitude on b0 and b1000.
``chronic_infarct``
    tissue replaced by fluid / gliosis: ADC 1.5-2.8e-3, S0 +20-100 %, always
    darker on b1000 than the parenchyma it replaced.
``csf_partial_volume``
    age-related widening of sulci and ventricles: parenchyma next to CSF is
    partly replaced by CSF, so thick-slice boundary voxels get the
    intermediate ADC values of real scans.
``eyes``
    vitreous (S0 ~ CSF, ADC 2.8-3.2e-3) where the slab covers the orbits.
``scalp_fat``
    imperfect fat suppression: residual scalp fat (ADC ~ 0, so as bright on
    b1000 as on b0), displaced along phase encode by its chemical shift.

Each mimic is drawn per case with its own probability
(:data:`DEFAULT_MIMIC_PROBABILITIES`) from its own random stream, derived from
the phantom seed only: switching one mimic on or off never changes another,
nor the head, lesions, tissue parameters or noise of the seed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from models.synth.anatomy import Anatomy
from models.synth.diffusion import TissueParameters, bias_field
from models.synth.geometry import Pose, ScanGeometry
from models.synth.lesions import LesionField, LesionSite, LesionSpec, rasterise_lesions

MIMIC_NAMES: tuple[str, ...] = (
    "cortical_ribbon",
    "t2_shine_through",
    "susceptibility",
    "nyquist_ghost",
    "chronic_infarct",
    "csf_partial_volume",
    "eyes",
    "scalp_fat",
)

#: Per-case probability of each mimic when nothing else is asked for.
DEFAULT_MIMIC_PROBABILITIES: dict[str, float] = {
    "cortical_ribbon": 0.9,
    "t2_shine_through": 0.5,
    "susceptibility": 0.8,
    "nyquist_ghost": 0.5,
    "chronic_infarct": 0.3,
    "csf_partial_volume": 0.6,
    "eyes": 0.95,
    "scalp_fat": 0.4,
}

#: What ``mimics`` of :func:`models.synth.phantom.generate_phantom` may be.
MimicsArg = bool | str | Iterable[str] | Mapping[str, float] | None

_MIMIC_TAG = 0x3D_1C5


def mimic_probabilities(mimics: MimicsArg) -> dict[str, float]:
    """Per-mimic probabilities for a ``mimics`` argument.

    ``None`` / ``True`` / ``"default"``: :data:`DEFAULT_MIMIC_PROBABILITIES`;
    ``False`` / ``"none"`` / ``"off"`` / ``()``: no mimic (the studies of
    generator 1.0, bit for bit); names (an iterable, or a comma-separated
    string): exactly those, always; a mapping name -> probability: those
    probabilities, unnamed mimics off.
    """
    if mimics is None or mimics is True:
        return dict(DEFAULT_MIMIC_PROBABILITIES)
    if mimics is False:
        return {name: 0.0 for name in MIMIC_NAMES}
    if isinstance(mimics, str):
        text = mimics.strip().lower()
        if text in ("default", "on", "all-default"):
            return dict(DEFAULT_MIMIC_PROBABILITIES)
        if text in ("none", "off", ""):
            return {name: 0.0 for name in MIMIC_NAMES}
        if text == "all":
            return {name: 1.0 for name in MIMIC_NAMES}
        mimics = [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(mimics, Mapping):
        given = {str(k): float(v) for k, v in mimics.items()}
    else:
        given = {str(name): 1.0 for name in mimics}
    unknown = sorted(set(given) - set(MIMIC_NAMES))
    if unknown:
        raise ValueError(f"unknown mimic(s) {unknown}; known: {list(MIMIC_NAMES)}")
    bad = {k: v for k, v in given.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"mimic probabilities must be within [0, 1]: {bad}")
    return {name: given.get(name, 0.0) for name in MIMIC_NAMES}


@dataclass(slots=True)
class MimicPlan:
    """The mimics drawn for one seed, their random streams and what they became."""

    drawn: tuple[str, ...]
    rngs: dict[str, np.random.Generator]
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)  # drawn but not visible (eyes off-slab)

    def on(self, name: str) -> bool:
        return name in self.drawn

    @property
    def present(self) -> tuple[str, ...]:
        """Names of the mimics in the images (recorded in truth.json)."""
        return tuple(n for n in self.drawn if n not in self.dropped)


def draw_mimics(seed: int, mimics: MimicsArg = None) -> MimicPlan:
    """Which mimics phantom ``seed`` has (one uniform per mimic, always all drawn)."""
    probabilities = mimic_probabilities(mimics)
    children = np.random.SeedSequence([int(seed), 0x57_0E_5E_6, _MIMIC_TAG]).spawn(
        1 + len(MIMIC_NAMES)
    )
    u = np.random.default_rng(children[0]).random(len(MIMIC_NAMES))
    drawn = tuple(n for n, x in zip(MIMIC_NAMES, u, strict=True) if x < probabilities[n])
    rngs = {
        n: np.random.default_rng(s) for n, s in zip(MIMIC_NAMES, children[1:], strict=True)
    }
    return MimicPlan(drawn=drawn, rngs=rngs)


# --------------------------------------------------------------------------
# Tissue level (MNI lattice)


def ribbon_parameters(
    rng: np.random.Generator, params: TissueParameters, b_value: float
) -> tuple[TissueParameters, dict[str, Any]]:
    """GM/WM parameters giving a visible cortical ribbon on the b1000 trace.

    ADCs are drawn first; the GM S0 then makes the pure-tissue GM/WM trace
    ratio a draw within [1.15, 1.42] that keeps the b0 GM/WM ratio within
    [1.25, 1.70] (PD 0.8/0.7 and T2 ~100/75 ms at TE 80-100 ms).  Partial
    volume with WM and CSF at 4-5 mm slices brings the ratio *measured* on
    the cortex (GM fraction > 0.6) to ~1.1-1.3, as on real b1000 traces.
    """
    adc_gm = float(rng.uniform(0.80e-3, 0.90e-3))
    adc_wm = float(rng.uniform(0.70e-3, 0.75e-3))
    decay = math.exp(-b_value * (adc_gm - adc_wm))
    lo, hi = max(1.15, 1.25 * decay), min(1.42, 1.70 * decay)
    ratio = float(rng.uniform(lo, hi))
    s0 = list(params.s0)
    s0[0] = s0[1] * ratio / decay
    adc = list(params.adc)
    adc[0], adc[1] = adc_gm, adc_wm
    new = TissueParameters(s0=tuple(s0), adc=tuple(adc))  # type: ignore[arg-type]
    return new, {
        "gm_wm_trace_ratio": ratio,
        "gm_wm_s0_ratio": s0[0] / s0[1],
        "adc_gm": adc_gm,
        "adc_wm": adc_wm,
    }


@functools.lru_cache(maxsize=1)
def _csf_proximity(anatomy: Anatomy) -> npt.NDArray[np.float32]:
    """CSF fraction smoothed over ~2 mm: how much CSF borders each voxel."""
    csf = np.ascontiguousarray(anatomy.tissues[..., 2])
    prox = ndi.gaussian_filter(csf, sigma=1.5).astype(np.float32)
    prox.setflags(write=False)
    return prox


def atrophy_map(
    rng: np.random.Generator, anatomy: Anatomy
) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """Fraction (0..0.7) of each voxel's parenchyma replaced by CSF (wider sulci/ventricles).

    Proportional to the CSF next to the voxel, with a smooth front-back and
    top-bottom modulation (atrophy is rarely uniform).
    """
    strength = float(rng.uniform(0.6, 1.6))
    prox = _csf_proximity(anatomy)
    z, y = anatomy.shape[0], anatomy.shape[1]
    gz, gy = rng.uniform(-0.4, 0.4, size=2)
    mod_z = (1.0 + gz * np.linspace(-1.0, 1.0, z, dtype=np.float32))[:, None, None]
    mod_y = (1.0 + gy * np.linspace(-1.0, 1.0, y, dtype=np.float32))[None, :, None]
    a = prox * np.float32(strength)
    a *= mod_z
    a *= mod_y
    np.clip(a, 0.0, 0.7, out=a)
    return a.astype(np.float32), {"strength": strength, "gradient_z": float(gz),
                                  "gradient_y": float(gy)}


def _periventricular_candidates(anatomy: Anatomy) -> npt.NDArray[np.int64]:
    """Subcortical (WM-major) candidate voxels beside the lateral ventricles."""
    idx = np.stack(np.unravel_index(anatomy.subcortical_candidates, anatomy.shape), axis=1)
    ras = anatomy.ras_of_index(idx.astype(np.float64))
    x, y, z = np.abs(ras[:, 0]), ras[:, 1], ras[:, 2]
    keep = (x > 10) & (x < 32) & (y > -45) & (y < 30) & (z > 2) & (z < 34)
    return anatomy.subcortical_candidates[keep]


def _centre(anatomy: Anatomy, candidates: npt.NDArray[np.int64], rng: np.random.Generator
            ) -> tuple[float, float, float]:
    flat = int(candidates[rng.integers(len(candidates))])
    ijk = np.array(np.unravel_index(flat, anatomy.shape), dtype=np.float64)
    c = anatomy.ras_of_index(ijk[None, :])[0]
    return (float(c[0]), float(c[1]), float(c[2]))


def shine_through_field(
    rng: np.random.Generator, anatomy: Anatomy, b_value: float, mni_per_patient_volume: float
) -> tuple[LesionField | None, dict[str, Any]]:
    """White-matter hyperintensities / old lesions: bright on b1000, ADC not low."""
    n = int(rng.integers(2, 9))
    periventricular = _periventricular_candidates(anatomy)
    specs: list[LesionSpec] = []
    for _ in range(n):
        if rng.random() < 0.7:
            site, cands = LesionSite.SUBCORTICAL, periventricular
        else:
            site = LesionSite(rng.choice([LesionSite.SUBCORTICAL, LesionSite.CORTICAL]))
            cands = (anatomy.subcortical_candidates if site is LesionSite.SUBCORTICAL
                     else anatomy.cortical_candidates)
        volume = float(math.exp(rng.uniform(math.log(0.2), math.log(6.0))))
        inc = float(rng.uniform(0.4, 1.5))
        dwi_ratio = float(rng.uniform(1.1, 1.5))
        # (1 + inc) * exp(-b (adc - adc_wm)) = dwi_ratio, with adc in [0.9, 1.5]e-3
        adc = 0.72e-3 + math.log((1.0 + inc) / dwi_ratio) / b_value
        adc = float(np.clip(adc, 0.9e-3, 1.5e-3))
        specs.append(LesionSpec(site=site, centre_mni_mm=_centre(anatomy, cands, rng),
                                target_volume_ml=volume, adc=adc, s0_increase=inc))
    lesion_field = rasterise_lesions(
        rng, specs, anatomy, mni_per_patient_volume=mni_per_patient_volume
    )
    return lesion_field, {"regions": [_spec_record(s) for s in specs]}


def chronic_infarct_field(
    rng: np.random.Generator, anatomy: Anatomy, b_value: float, mni_per_patient_volume: float
) -> tuple[LesionField | None, dict[str, Any]]:
    """Old infarcts turned to fluid / gliosis: dark on b1000, ADC high."""
    n = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    specs: list[LesionSpec] = []
    for _ in range(n):
        if rng.random() < 0.5:  # territorial (cortical) scar
            site = LesionSite.CORTICAL
            volume = float(math.exp(rng.uniform(math.log(2.0), math.log(50.0))))
        else:  # lacune
            site = LesionSite(rng.choice([LesionSite.SUBCORTICAL, LesionSite.INFRATENTORIAL],
                                         p=[0.75, 0.25]))
            volume = float(math.exp(rng.uniform(math.log(0.1), math.log(1.5))))
        cands = {
            LesionSite.CORTICAL: anatomy.cortical_candidates,
            LesionSite.SUBCORTICAL: anatomy.subcortical_candidates,
            LesionSite.INFRATENTORIAL: anatomy.infratentorial_candidates,
        }[site]
        adc = float(rng.uniform(1.5e-3, 2.8e-3))
        inc = float(rng.uniform(0.2, 1.0))
        # Never brighter than 0.75 x the parenchyma (ADC ~0.75e-3) on b1000.
        inc = min(inc, 0.75 * math.exp(b_value * (adc - 0.75e-3)) - 1.0)
        specs.append(LesionSpec(site=site, centre_mni_mm=_centre(anatomy, cands, rng),
                                target_volume_ml=volume, adc=adc, s0_increase=inc))
    lesion_field = rasterise_lesions(
        rng, specs, anatomy, mni_per_patient_volume=mni_per_patient_volume
    )
    return lesion_field, {"regions": [_spec_record(s) for s in specs]}


def _spec_record(spec: LesionSpec) -> dict[str, Any]:
    return {
        "site": spec.site.value,
        "centre_mni_mm": list(spec.centre_mni_mm),
        "target_volume_ml": spec.target_volume_ml,
        "adc_mm2_s": spec.adc,
        "s0_increase": spec.s0_increase,
    }


def _box_overlap(
    a: tuple[slice, slice, slice], b: tuple[slice, slice, slice]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Index slices into box ``a``'s and box ``b``'s arrays of their intersection."""
    in_a, in_b = [], []
    for sa, sb in zip(a, b, strict=True):
        lo, hi = max(sa.start, sb.start), min(sa.stop, sb.stop)
        if hi <= lo:
            return None
        in_a.append(slice(lo - sa.start, hi - sa.start))
        in_b.append(slice(lo - sb.start, hi - sb.start))
    return tuple(in_a), tuple(in_b)


def exclude_lesions(field_: LesionField, lesions: LesionField | None) -> LesionField:
    """``field_`` with its occupancy reduced by (1 - acute lesion occupancy)."""
    if lesions is None:
        return field_
    overlap = _box_overlap(field_.box, lesions.box)
    if overlap is None:
        return field_
    in_field, in_lesion = overlap
    occ = field_.occupancy.copy()
    occ[in_field] *= 1.0 - lesions.occupancy[in_lesion]
    return LesionField(box=field_.box, occupancy=occ, adc=field_.adc,
                       s0_increase=field_.s0_increase)


# --------------------------------------------------------------------------
# Image level (DWI grid: slices, rows, columns; rows run along phase encode)


def voxel_mni(
    geometry: ScanGeometry, pose: Pose, slice_offset: float = 0.0
) -> npt.NDArray[np.float32]:
    """MNI RAS mm of every voxel centre (shifted by ``slice_offset`` slices), (S, R, C, 3)."""
    m = np.linalg.inv(pose.matrix()) @ geometry.index_to_patient()
    s, r, c = geometry.shape
    k = np.arange(s, dtype=np.float64) + slice_offset
    out = (
        k[:, None, None, None] * m[:3, 0]
        + np.arange(r, dtype=np.float64)[None, :, None, None] * m[:3, 1]
        + np.arange(c, dtype=np.float64)[None, None, :, None] * m[:3, 2]
        + m[:3, 3]
    )
    return out.astype(np.float32)


#: Air cavities / dense bone next to the brain, MNI mm (centres of the field sources).
#: Air cavities / dense bone next to the brain: MNI mm of the tissue-air interface
#: where the off-resonance field (and so the distortion) peaks.
SUSCEPTIBILITY_SITES: dict[str, tuple[float, float, float]] = {
    "frontal_sinus": (0.0, 62.0, 6.0),
    "ethmoid_orbitofrontal": (0.0, 38.0, -26.0),
    "sphenoid_skull_base": (0.0, 14.0, -34.0),
    "petrous_left": (-44.0, -24.0, -38.0),
    "petrous_right": (44.0, -24.0, -38.0),
}


def susceptibility_fields(
    rng: np.random.Generator, geometry: ScanGeometry, pose: Pose,
    mni: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], dict[str, Any]]:
    """Phase-encode displacement (pixels) and dephasing factor (0..1) on the DWI grid.

    Each source is an isotropic Gaussian off-resonance blob (sigma 7-12 mm)
    whose along-PE shift peaks at ``(1 - 1/P) * sigma * sqrt(e)``, so its
    steepest compression piles the signal up by P (1.5-3); the opposite flank
    is stretched, and through-slice dephasing darkens the region nearest the air.
    """
    shift = np.zeros(geometry.shape, dtype=np.float32)
    dephase = np.ones(geometry.shape, dtype=np.float32)
    polarity = 1.0 if rng.random() < 0.5 else -1.0  # phase-encode blip direction
    sites = [s for s in SUSCEPTIBILITY_SITES if rng.random() < 0.7]
    if not sites:
        sites = [str(rng.choice(list(SUSCEPTIBILITY_SITES)))]
    pe_mm = geometry.pixel_spacing[0]
    records = []
    tail = math.exp(-4.5)
    for name in sites:
        centre = np.asarray(SUSCEPTIBILITY_SITES[name]) + rng.uniform(-4.0, 4.0, size=3)
        sigma = float(rng.uniform(7.0, 12.0))  # MNI mm
        pile_up = float(rng.uniform(1.5, 3.0))
        sign = polarity * (1.0 if rng.random() < 0.5 else -1.0)
        amp_mm = (1.0 - 1.0 / pile_up) * sigma * math.sqrt(math.e) * pose.scale
        dropout = float(rng.uniform(0.3, 0.8))
        r2 = np.sum((mni - centre.astype(np.float32)) ** 2, axis=-1) / np.float32(sigma**2)
        blob = np.clip((np.exp(-0.5 * r2) - tail) / (1.0 - tail), 0.0, None)
        shift += np.float32(sign * amp_mm / pe_mm) * blob
        dephase *= 1.0 - np.float32(dropout) * np.exp(-0.5 * r2 / 0.25)
        records.append({"site": name, "centre_mni_mm": [float(v) for v in centre],
                        "sigma_mm": sigma, "pile_up": pile_up, "shift_mm": sign * amp_mm,
                        "dropout": dropout})
    return shift, dephase.astype(np.float32), {"sources": records}


def distort(
    image: npt.NDArray[np.float32], shift: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Push ``image`` along axis 1 by ``shift`` pixels, conserving signal (EPI distortion).

    Each source pixel [r-1/2, r+1/2] lands on [r-1/2+d, r+1/2+d] (d at its
    edges) and spreads its signal over it, so compression piles signal up and
    stretching thins it out.  Lines without any shift are returned untouched.
    """
    s, r, c = image.shape
    moved = np.abs(shift).max(axis=1) > 1e-4  # (S, C) lines that change
    if not moved.any():
        return image
    img = np.transpose(image, (0, 2, 1))[moved].astype(np.float64)  # (L, R)
    d = np.transpose(shift, (0, 2, 1))[moved].astype(np.float64)
    d_edges = np.concatenate([d[:, :1], 0.5 * (d[:, 1:] + d[:, :-1]), d[:, -1:]], axis=1)
    edges = np.arange(r + 1, dtype=np.float64) - 0.5
    src = edges[None, :] + d_edges
    src = np.maximum.accumulate(np.clip(src, -r, 2 * r), axis=1)  # no fold-over
    # Keep every line strictly increasing so one np.interp serves them all.
    src += np.arange(r + 1)[None, :] * 1e-9
    mass = np.concatenate([np.zeros((img.shape[0], 1)), np.cumsum(img, axis=1)], axis=1)
    # One flat interpolation for all lines: line L lives at x + L * stride and its
    # cumulative signal continues the previous lines' total, so both stay monotone.
    offsets = (np.arange(img.shape[0], dtype=np.float64) * (4.0 * r + 8.0))[:, None]
    line_total = np.concatenate([[0.0], np.cumsum(mass[:, -1])[:-1]])
    flat_x = (src + offsets).ravel()
    flat_y = (mass + line_total[:, None]).ravel()
    target = (edges[None, :] + offsets).ravel()
    at_target = np.interp(target, flat_x, flat_y).reshape(img.shape[0], r + 1)
    at_target -= line_total[:, None]
    out_lines = np.diff(at_target, axis=1).astype(np.float32)
    out = np.transpose(image, (0, 2, 1)).copy()
    out[moved] = out_lines
    return np.ascontiguousarray(np.transpose(out, (0, 2, 1)))


def eye_fraction(
    rng: np.random.Generator, geometry: ScanGeometry, pose: Pose
) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """Partial-volume fraction of both vitreous bodies on the DWI grid (4 through-plane samples)."""
    y = float(rng.uniform(48.0, 56.0))
    z = float(rng.uniform(-42.0, -35.0))
    x = float(rng.uniform(30.0, 35.0))
    radius = float(rng.uniform(10.5, 12.0))  # MNI mm (the pose scales it)
    centres = [np.array([-x, y, z], dtype=np.float32), np.array([x, y, z], dtype=np.float32)]
    frac = np.zeros(geometry.shape, dtype=np.float32)
    ramp = float(geometry.pixel_spacing[0]) / pose.scale  # in-plane soft edge, MNI mm
    n_through = 4
    for j in range(n_through):
        offset = ((j + 0.5) / n_through - 0.5) * geometry.slice_thickness / geometry.slice_spacing
        mni = voxel_mni(geometry, pose, slice_offset=offset)
        for centre in centres:
            dist = np.sqrt(np.sum((mni - centre) ** 2, axis=-1))
            frac += np.clip(0.5 - (dist - radius) / ramp, 0.0, 1.0)
    frac = np.clip(frac / n_through, 0.0, 1.0)
    return frac.astype(np.float32), {
        "centres_mni_mm": [[float(v) for v in c] for c in centres], "radius_mm": radius,
    }


def ghost(
    image: npt.NDArray[np.float32], amplitude: float, readout_gradient: float
) -> npt.NDArray[np.float32]:
    """``image`` plus its N/2 Nyquist ghost along axis 1 (phase encode).

    The ghost's strength varies linearly across the readout (a linear phase
    error between odd and even echoes), ``amplitude * (1 + g * x)``, x in [-1, 1].
    """
    cols = image.shape[2]
    across = np.linspace(-1.0, 1.0, cols, dtype=np.float32)
    weight = np.clip(np.float32(amplitude) * (1.0 + np.float32(readout_gradient) * across),
                     0.0, None)
    shifted = np.roll(image, image.shape[1] // 2, axis=1)
    return (image + shifted * weight[None, None, :]).astype(np.float32)


def scalp_fat_image(
    rng: np.random.Generator, scalp: npt.NDArray[np.float32], rows: int
) -> tuple[npt.NDArray[np.float32], float, dict[str, Any]]:
    """Residual (unsuppressed) fat of the scalp, shifted by its chemical shift along PE.

    Returns the fat S0 image (relative units, CSF ~ 1), its ADC and a record.
    """
    level = float(rng.uniform(0.05, 0.30))
    variation = bias_field(rng, scalp.shape, 0.6)  # fat saturation is never uniform
    shift_px = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.0, 0.08) * rows)
    fat = scalp * variation * np.float32(level)
    fat = ndi.shift(fat, (0.0, shift_px, 0.0), order=1, mode="constant", cval=0.0)
    adc = float(rng.uniform(0.005e-3, 0.03e-3))
    return fat.astype(np.float32), adc, {"level": level, "shift_px": shift_px, "adc_mm2_s": adc}
