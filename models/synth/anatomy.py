"""Head anatomy for phantoms, derived once per process from the MNI152 2009a maps.

nilearn's wheel ships the ICBM152 2009a symmetric grey- and white-matter
probability maps, so every phantom can be built from real anatomy without
downloading anything.  We derive the rest of the head from them:

* intracranial volume (ICV): the closed, hole-filled GM+WM envelope, dilated by
  ~2 mm, so sulcal and ventricular CSF appear where they should;
* CSF = ICV - GM - WM;
* skull (no MR signal) as a ~4 mm shell around the ICV and scalp (weak signal
  on a fat-suppressed EPI b0) as a further ~5 mm shell, so the head is not a
  floating brain in the field of view.

All maps live on the 1 mm MNI lattice, cropped to the head, as float32 partial
volume fractions.  Building them takes about a second; they are cached with
:func:`functools.lru_cache` and are read-only afterwards.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

#: Tissue channels of :attr:`Anatomy.tissues`, in order.
TISSUES: tuple[str, ...] = ("gm", "wm", "csf", "scalp")

_MNI_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Lowest MNI z (mm) of the cerebellum; the brain stem continues below it into
#: the cord, which a stroke DWI slab does not need to cover.
CEREBELLUM_FLOOR_Z_MM = -63.0

#: MNI region used for infratentorial lesions (cerebellum and brain stem).
_INFRATENTORIAL_MAX_Z_MM = -20.0
_INFRATENTORIAL_MAX_Y_MM = -15.0


@dataclass(frozen=True, slots=True, eq=False)
class Anatomy:
    """Partial-volume tissue maps on a cropped 1 mm MNI lattice.

    ``tissues`` has shape (Z, Y, X, 4) (axes reversed from NIfTI) with
    channels :data:`TISSUES`; for every voxel gm + wm + csf <= 1.
    ``index_to_ras`` maps (i, j, k, 1) array indices to MNI RAS millimetres.
    The point clouds are subsampled voxel centres (RAS mm) used to place the
    scan slab and to crop the sampling work.
    """

    tissues: npt.NDArray[np.float32]
    index_to_ras: npt.NDArray[np.float64]
    parenchyma: npt.NDArray[np.float32]
    brain_points_ras: npt.NDArray[np.float64]
    head_points_ras: npt.NDArray[np.float64]
    cortical_candidates: npt.NDArray[np.int64]
    subcortical_candidates: npt.NDArray[np.int64]
    infratentorial_candidates: npt.NDArray[np.int64]

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.parenchyma.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    def ras_of_index(self, ijk: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """RAS millimetres of (N, 3) array indices."""
        return ijk @ self.index_to_ras[:3, :3].T + self.index_to_ras[:3, 3]


def mni_data_dir() -> str:
    """Folder of the MNI152 maps bundled in the nilearn wheel."""
    import nilearn

    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")


def _ball(radius: int) -> npt.NDArray[np.bool_]:
    grid = np.indices((2 * radius + 1,) * 3) - radius
    return np.asarray((grid**2).sum(axis=0) <= radius * radius)


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """Build (once per process) the tissue maps every phantom is sampled from."""
    import nibabel as nib

    data_dir = mni_data_dir()
    images: dict[str, Any] = {
        name: nib.load(os.path.join(data_dir, f)) for name, f in _MNI_FILES.items()
    }
    # Lattice axes are stored (z, y, x): the fastest axis then runs along the
    # image rows of axial slices, so trilinear sampling walks memory in order
    # (3-4x faster than the NIfTI (x, y, z) order, which misses cache).
    affine = np.asarray(images["gm"].affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    gm = np.ascontiguousarray(np.asarray(images["gm"].dataobj, dtype=np.float32).T) / 255.0
    wm = np.ascontiguousarray(np.asarray(images["wm"].dataobj, dtype=np.float32).T) / 255.0
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    parenchyma = np.minimum(gm + wm, 1.0)

    # Morphology at 2 mm: the envelope is smooth, and this is 8x cheaper.
    brain = parenchyma > 0.5
    pad = [(0, s % 2) for s in brain.shape]
    coarse = np.pad(brain, pad).reshape(
        brain.shape[0] // 2 + pad[0][1], 2, brain.shape[1] // 2 + pad[1][1], 2,
        brain.shape[2] // 2 + pad[2][1], 2,
    ).any(axis=(1, 3, 5))
    coarse = np.pad(coarse, 4)
    closed = ndi.binary_closing(coarse, _ball(3))
    filled = ndi.binary_fill_holes(closed)
    outside_mm = ndi.distance_transform_edt(~filled) * 2.0
    outside_mm = outside_mm[4:-4, 4:-4, 4:-4]
    # Back to 1 mm: linear interpolation of the (smooth) distance map.
    zoom = [brain.shape[i] / outside_mm.shape[i] for i in range(3)]
    dist = ndi.zoom(outside_mm.astype(np.float32), zoom, order=1, mode="nearest")
    dist = dist[: brain.shape[0], : brain.shape[1], : brain.shape[2]]
    # Soft edges (1 mm ramps) instead of binary staircases.
    icv = np.clip(3.0 - dist, 0.0, 1.0)  # envelope dilated by ~2 mm
    icv = np.maximum(icv, parenchyma)
    skull_outer = np.clip(7.5 - dist, 0.0, 1.0)
    scalp_outer = np.clip(12.5 - dist, 0.0, 1.0)
    scalp = np.clip(scalp_outer - skull_outer, 0.0, 1.0)
    csf = np.clip(icv - gm - wm, 0.0, 1.0)

    # Crop to the head (scalp support) with a small margin.
    support = scalp_outer > 0
    lo = np.zeros(3, dtype=np.int64)
    hi = np.zeros(3, dtype=np.int64)
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(support.any(axis=other))
        lo[axis] = max(int(present[0]) - 2, 0)
        hi[axis] = min(int(present[-1]) + 3, support.shape[axis])
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    tissues = np.stack([gm[crop], wm[crop], csf[crop], scalp[crop]], axis=-1)
    tissues = np.ascontiguousarray(tissues, dtype=np.float32)
    index_to_ras = affine.copy()
    index_to_ras[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]

    par = np.ascontiguousarray(parenchyma[crop], dtype=np.float32)
    # Conditions on MNI y/z depend on one index each: build them as 1-D rules.
    z_mm = index_to_ras[2, 3] + np.arange(par.shape[0]) * index_to_ras[2, 0]
    y_mm = index_to_ras[1, 3] + np.arange(par.shape[1]) * index_to_ras[1, 1]
    above_floor = (z_mm >= CEREBELLUM_FLOOR_Z_MM)[:, None, None]

    def points(mask: npt.NDArray[np.bool_], step: int) -> npt.NDArray[np.float64]:
        ijk = np.flatnonzero(mask)[::step]
        idx = np.stack(np.unravel_index(ijk, mask.shape), axis=1).astype(np.float64)
        return idx @ index_to_ras[:3, :3].T + index_to_ras[:3, 3]

    brain_points = points((par > 0.5) & above_floor, 7)
    head_points = points(scalp_outer[crop] > 0, 5)

    # Candidate lesion centres: well inside parenchyma (p > 0.8).
    core = par > 0.8
    infra_zone = (
        (z_mm < _INFRATENTORIAL_MAX_Z_MM) & (z_mm >= CEREBELLUM_FLOOR_Z_MM + 5)
    )[:, None, None] & (y_mm < _INFRATENTORIAL_MAX_Y_MM)[None, :, None]
    supra = core & (z_mm > -10.0)[:, None, None]
    gm_major = tissues[..., 0] > tissues[..., 1]
    infra = core & infra_zone
    cortical = supra & gm_major
    subcortical = supra & ~gm_major

    tissues.setflags(write=False)
    par.setflags(write=False)
    anatomy = Anatomy(
        tissues=tissues,
        index_to_ras=index_to_ras,
        parenchyma=par,
        brain_points_ras=brain_points,
        head_points_ras=head_points,
        cortical_candidates=np.flatnonzero(cortical),
        subcortical_candidates=np.flatnonzero(subcortical),
        infratentorial_candidates=np.flatnonzero(infra),
    )
    logger.debug(
        "anatomy ready: lattice %s, ICV %.0f mL, brain %.0f mL",
        anatomy.shape,
        float(icv.sum()) / 1000.0,
        float(parenchyma.sum()) / 1000.0,
    )
    return anatomy
