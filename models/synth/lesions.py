"""Acute ischaemic lesions as smooth implicit shapes on the MNI lattice.

A lesion is the super-level set of an implicit function: the union of a few
randomly perturbed ellipsoids plus smooth random noise (so borders are
irregular, and large lesions can be multi-lobed as territorial infarcts are).
The level is solved so that the *parenchymal* volume (GM+WM fraction inside
the shape) hits a target; the shape is then restricted to one hemisphere above
the tentorium (vascular territories respect the midline) and multiplied by
the parenchyma fraction, so a lesion never "contains" CSF.

The implicit function is rasterised on the 1 mm MNI lattice with a 1 mm soft
edge.  Every quantity derived from it (signals, lesion fraction) is linear in
it, so trilinear sampling at the DWI sub-samples is equivalent to evaluating
the (1 mm band-limited) function there, at a fraction of the cost.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from models.synth.anatomy import Anatomy

logger = logging.getLogger(__name__)


class LesionClass(enum.StrEnum):
    """Size class of the total lesion volume of a phantom (in mL)."""

    NONE = "none"
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"

    @property
    def volume_range_ml(self) -> tuple[float, float]:
        return _VOLUME_RANGES_ML[self]


_VOLUME_RANGES_ML: dict[LesionClass, tuple[float, float]] = {
    LesionClass.NONE: (0.0, 0.0),
    LesionClass.SMALL: (0.2, 1.7),
    LesionClass.MEDIUM: (1.7, 14.0),
    LesionClass.LARGE: (14.0, 120.0),
}

#: Default class probabilities: small lesions are the hard, clinically
#: important cases, so they are well represented.
CLASS_PROBABILITIES: dict[LesionClass, float] = {
    LesionClass.SMALL: 0.30,
    LesionClass.MEDIUM: 0.35,
    LesionClass.LARGE: 0.25,
    LesionClass.NONE: 0.10,
}


class LesionSite(enum.StrEnum):
    CORTICAL = "cortical"
    SUBCORTICAL = "subcortical"
    INFRATENTORIAL = "infratentorial"


@dataclass(frozen=True, slots=True)
class LesionSpec:
    """One lesion as placed: where, how big (target, patient mL), how it looks."""

    site: LesionSite
    centre_mni_mm: tuple[float, float, float]
    target_volume_ml: float
    adc: float  # mm2/s
    s0_increase: float  # relative T2 shine-through, e.g. 0.2 = +20 %


@dataclass(frozen=True, slots=True, eq=False)
class LesionField:
    """Union of all lesions of one phantom on a sub-box of the MNI lattice.

    ``occupancy`` (0..1) is the lesion indicator of the parenchyma in each
    voxel of the box ``box`` (array slices of the anatomy lattice);
    ``adc`` is the lesion ADC there (mm2/s) and ``s0_increase`` the relative
    S0 increase.
    """

    box: tuple[slice, slice, slice]
    occupancy: npt.NDArray[np.float32]
    adc: npt.NDArray[np.float32]
    s0_increase: npt.NDArray[np.float32]


def choose_lesion_class(rng: np.random.Generator) -> LesionClass:
    classes = list(CLASS_PROBABILITIES)
    p = np.array([CLASS_PROBABILITIES[c] for c in classes])
    return classes[int(rng.choice(len(classes), p=p / p.sum()))]


def plan_lesions(
    rng: np.random.Generator, lesion_class: LesionClass, anatomy: Anatomy
) -> list[LesionSpec]:
    """Draw number, total volume, sites and appearance of the lesions."""
    if lesion_class is LesionClass.NONE:
        return []
    lo, hi = lesion_class.volume_range_ml
    total = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    n = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    shares = rng.dirichlet(np.full(n, 3.0)) if n > 1 else np.ones(1)
    specs: list[LesionSpec] = []
    for share in shares:
        volume = total * float(share)
        # Big lesions are territorial (MCA/ACA/PCA): supratentorial only.
        if volume > 14.0:
            site = LesionSite.CORTICAL if rng.random() < 0.7 else LesionSite.SUBCORTICAL
        else:
            site = LesionSite(
                rng.choice(
                    [LesionSite.CORTICAL, LesionSite.SUBCORTICAL, LesionSite.INFRATENTORIAL],
                    p=[0.4, 0.35, 0.25],
                )
            )
        candidates = {
            LesionSite.CORTICAL: anatomy.cortical_candidates,
            LesionSite.SUBCORTICAL: anatomy.subcortical_candidates,
            LesionSite.INFRATENTORIAL: anatomy.infratentorial_candidates,
        }[site]
        flat = int(candidates[rng.integers(len(candidates))])
        ijk = np.array(np.unravel_index(flat, anatomy.shape), dtype=np.float64)
        centre = anatomy.ras_of_index(ijk[None, :])[0]
        specs.append(
            LesionSpec(
                site=site,
                centre_mni_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                target_volume_ml=volume,
                adc=float(rng.uniform(0.35e-3, 0.55e-3)),
                s0_increase=float(rng.uniform(0.10, 0.30)),
            )
        )
    return specs


def _random_rotation(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return np.asarray(q * np.sign(np.diag(r)))


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float
) -> npt.NDArray[np.float32]:
    """Unit-variance Gaussian-smoothed noise; built coarse and upsampled when sigma is big.

    A 4-sigma Gaussian kernel of a large lesion spans ~70 voxels per axis;
    filtering on a grid ``factor`` times coarser costs ``factor**4`` less and
    looks the same, because the noise is smooth at that scale anyway.
    """
    factor = max(1, int(sigma // 2.0))
    coarse_shape = tuple(max(2, -(-n // factor) + 1) for n in shape)
    noise = ndi.gaussian_filter(
        rng.standard_normal(coarse_shape).astype(np.float32), sigma=sigma / factor
    )
    if factor > 1:
        noise = ndi.zoom(noise, factor, order=1)[tuple(slice(0, n) for n in shape)]
    noise = np.ascontiguousarray(noise[tuple(slice(0, n) for n in shape)])
    noise /= float(noise.std()) + 1e-6
    return noise


def _level_for_volume(
    implicit: npt.NDArray[np.float32], weight: npt.NDArray[np.float32], target_mm3: float
) -> float:
    """Level L such that sum(weight[implicit > L]) ~ target (weighted histogram, 4096 bins)."""
    lo, hi = float(implicit.min()), float(implicit.max())
    counts, edges = np.histogram(implicit, bins=4096, range=(lo, hi), weights=weight)
    above = np.cumsum(counts[::-1])[::-1]  # weight at or above each bin's lower edge
    k = int(np.searchsorted(-above, -target_mm3))  # first bin with less than target above
    k = min(max(k - 1, 0), len(counts) - 1)
    return float(edges[k])


def rasterise_lesions(
    rng: np.random.Generator,
    specs: list[LesionSpec],
    anatomy: Anatomy,
    *,
    mni_per_patient_volume: float,
) -> LesionField | None:
    """Rasterise ``specs`` on the anatomy lattice; None when there are none.

    ``mni_per_patient_volume`` converts patient mL into MNI mL (1/scale**3 of
    the pose), so target volumes hold in the patient.
    """
    if not specs:
        return None
    shape = np.array(anatomy.shape)
    ras_to_index = np.linalg.inv(anatomy.index_to_ras)
    boxes: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
    fields: list[npt.NDArray[np.float32]] = []
    for spec in specs:
        target_mm3 = spec.target_volume_ml * 1000.0 * mni_per_patient_volume
        r_eq = (3.0 * target_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)
        centre_idx = np.asarray(
            ras_to_index[:3, :3] @ np.asarray(spec.centre_mni_mm) + ras_to_index[:3, 3]
        )
        half = int(math.ceil(2.2 * r_eq + 6.0))
        lo = np.maximum(np.round(centre_idx).astype(np.int64) - half, 0)
        hi = np.minimum(np.round(centre_idx).astype(np.int64) + half + 1, shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        grid = np.stack(
            np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True)],
                        indexing="ij"),
            axis=-1,
        ) - centre_idx.astype(np.float32)

        # Union of perturbed ellipsoids: F = max_k (1 - |A_k (x - c_k)|).
        n_lobes = 1 if r_eq < 5.0 else int(rng.integers(1, 4 if r_eq < 12.0 else 6))
        envelope = np.full(grid.shape[:3], -np.inf, dtype=np.float32)
        for lobe in range(n_lobes):
            offset = np.zeros(3) if lobe == 0 else rng.standard_normal(3) * 0.45 * r_eq
            axes = r_eq * rng.uniform(0.6, 1.3, size=3) * (0.85 if n_lobes > 1 else 1.0)
            rot = _random_rotation(rng)
            a_mat = (rot / axes[None, :]).astype(np.float32)  # rows: x -> scaled coords
            local = (grid - offset.astype(np.float32)) @ a_mat
            radius = np.sqrt(np.sum(local * local, axis=-1))
            np.maximum(envelope, 1.0 - radius, out=envelope)
        noise = _smooth_noise(rng, envelope.shape, sigma=max(1.5, 0.35 * r_eq))
        implicit = envelope + 0.22 * noise

        weight = np.asarray(anatomy.parenchyma[box], dtype=np.float32).copy()
        if spec.site is not LesionSite.INFRATENTORIAL:
            # Lattice axis 2 is MNI x (see models.synth.anatomy).
            x_mm = anatomy.index_to_ras[0, 3] + np.arange(lo[2], hi[2]) * anatomy.index_to_ras[0, 2]
            side = 1.0 if spec.centre_mni_mm[0] >= 0 else -1.0  # midline centres go right
            same_side = (x_mm * side > 0) | (np.abs(x_mm) < 1.0)
            weight *= same_side[None, None, :].astype(np.float32)

        level = _level_for_volume(implicit, weight, target_mm3)
        # 1 mm soft edge: the implicit function changes by ~1/r_eq per mm.
        edge = 1.0 / max(r_eq, 1.0)
        occupancy = np.clip(0.5 + (implicit - level) / edge, 0.0, 1.0)
        occupancy *= (weight > 0).astype(np.float32)
        boxes.append((lo, hi))
        fields.append(occupancy.astype(np.float32))

    lo_all = np.min([b[0] for b in boxes], axis=0)
    hi_all = np.max([b[1] for b in boxes], axis=0)
    union_box = tuple(slice(int(a), int(b)) for a, b in zip(lo_all, hi_all, strict=True))
    size = tuple(int(b - a) for a, b in zip(lo_all, hi_all, strict=True))
    occupancy_all = np.zeros(size, dtype=np.float32)
    adc = np.zeros(size, dtype=np.float32)
    s0_inc = np.zeros(size, dtype=np.float32)
    for (lo, hi), occ, spec in zip(boxes, fields, specs, strict=True):
        sub = tuple(slice(int(a - b), int(c - b)) for a, c, b in zip(lo, hi, lo_all, strict=True))
        stronger = occ > occupancy_all[sub]
        occupancy_all[sub] = np.where(stronger, occ, occupancy_all[sub])
        adc[sub] = np.where(stronger, spec.adc, adc[sub])
        s0_inc[sub] = np.where(stronger, spec.s0_increase, s0_inc[sub])
    return LesionField(
        box=union_box,  # type: ignore[arg-type]
        occupancy=occupancy_all,
        adc=adc,
        s0_increase=s0_inc,
    )
