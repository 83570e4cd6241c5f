"""Imaging helpers every stage may use: a shared leaf next to :mod:`service.domain`.

Stages import these instead of each other, so intake, preprocess and derive stay independent
rooms (one copy of each operation, one place to get the geometry right):

* :func:`as_sitk` and :func:`resample_onto` -- an :class:`ImageVolume` as a SimpleITK image
  in patient coordinates, and resampling one volume onto another's grid ("the same grid,
  other voxels" is :meth:`ImageVolume.with_voxels`);
* :func:`functional_group_item` -- the per-frame-overrides-shared lookup of an Enhanced
  (multi-frame) object's functional groups.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset

from service.domain import ImageVolume


def as_sitk(volume: ImageVolume, voxels: npt.NDArray[Any] | None = None) -> sitk.Image:
    """``volume`` (or other ``voxels`` on its grid) as a SimpleITK image in patient coordinates."""
    image = sitk.GetImageFromArray(volume.voxels if voxels is None else voxels)
    image.SetOrigin(volume.origin)
    image.SetSpacing((volume.pixel_spacing[1], volume.pixel_spacing[0], volume.slice_spacing))
    direction = np.column_stack([volume.row_cosine, volume.column_cosine, volume.slice_cosine])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def resample_onto(volume: ImageVolume, reference: ImageVolume, *, linear: bool = True) -> ImageVolume:
    """Resample ``volume`` onto the grid of ``reference`` (patient coordinates; 0 outside)."""
    moving = as_sitk(volume)
    ref = as_sitk(reference)
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    out = sitk.Resample(moving, ref, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)
    return reference.with_voxels(sitk.GetArrayFromImage(out).astype(np.float32))


def functional_group_item(ds: Dataset, frame_index: int, keyword: str) -> Dataset | None:
    """First item of functional group ``keyword`` for frame ``frame_index`` (0-based).

    Per-frame groups override shared ones, as the standard says (PS3.3 C.7.6.16); None when
    neither has a non-empty one.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and frame_index < len(per_frame):
        seq = per_frame[frame_index].get(keyword, None)
        if seq:
            item: Dataset = seq[0]
            return item
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    if shared:
        seq = shared[0].get(keyword, None)
        if seq:
            shared_item: Dataset = seq[0]
            return shared_item
    return None
