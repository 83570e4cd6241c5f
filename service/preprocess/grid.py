"""The model grid: bring a study's (DWI, ADC) pair onto it and probabilities back.

The model grid keeps the DWI's slices and orientation and resamples each slice
to a fixed in-plane matrix and pixel spacing (from the model card), centred on
the DWI field of view.  Working at a fixed physical spacing makes the network
see lesions at the same size whatever matrix the scanner used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.domain import DiffusionStudy, ImageVolume
from service.imaging import resample_onto
from service.preprocess.profiles import DEFAULT_PROFILE, PROFILES, ProfileOptions


@dataclass(frozen=True, slots=True)
class ModelGrid:
    """In-plane matrix (rows, columns) and pixel spacing (mm) the model expects."""

    matrix: tuple[int, int] = (128, 128)
    pixel_spacing_mm: tuple[float, float] = (1.8, 1.8)

    def __post_init__(self) -> None:
        if min(self.matrix) < 8 or min(self.pixel_spacing_mm) <= 0:
            raise ValueError(f"invalid model grid {self}")


@dataclass(frozen=True, slots=True, eq=False)
class ModelInput:
    """The network input and the grid it lives on."""

    tensor: npt.NDArray[np.float32]  # (slices, 2, rows, columns): DWI, ADC
    grid: ImageVolume  # model grid geometry (voxels are the DWI channel)


def model_grid_for(volume: ImageVolume, grid: ModelGrid) -> ImageVolume:
    """The model-grid geometry for ``volume``: same slices, fixed in-plane matrix, same centre."""
    rows, cols = volume.shape[1], volume.shape[2]
    row_cos = np.asarray(volume.row_cosine)
    col_cos = np.asarray(volume.column_cosine)
    normal = np.asarray(volume.slice_cosine)
    centre = (
        np.asarray(volume.origin)
        + (cols - 1) / 2.0 * volume.pixel_spacing[1] * row_cos
        + (rows - 1) / 2.0 * volume.pixel_spacing[0] * col_cos
    )
    m_rows, m_cols = grid.matrix
    origin = (
        centre
        - (m_cols - 1) / 2.0 * grid.pixel_spacing_mm[1] * row_cos
        - (m_rows - 1) / 2.0 * grid.pixel_spacing_mm[0] * col_cos
    )
    return ImageVolume(
        voxels=np.zeros((volume.shape[0], m_rows, m_cols), dtype=np.float32),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        row_cosine=volume.row_cosine,
        column_cosine=volume.column_cosine,
        slice_cosine=(float(normal[0]), float(normal[1]), float(normal[2])),
        pixel_spacing=grid.pixel_spacing_mm,
        slice_spacing=volume.slice_spacing,
    )


def to_model_input(
    study: DiffusionStudy,
    grid: ModelGrid,
    profile: str = DEFAULT_PROFILE,
    options: ProfileOptions | None = None,
) -> ModelInput:
    """Normalise with ``profile`` on the native grid, then resample to the model grid."""
    try:
        normalise = PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown preprocessing profile {profile!r}") from None
    dwi_n, adc_n = normalise(study, options or ProfileOptions())
    target = model_grid_for(study.dwi, grid)
    dwi_m = resample_onto(study.dwi.with_voxels(dwi_n), target).voxels
    adc_m = resample_onto(study.adc.with_voxels(adc_n), target).voxels
    tensor = np.stack([dwi_m, adc_m], axis=1).astype(np.float32)
    return ModelInput(tensor=tensor, grid=target.with_voxels(dwi_m))


def resample_to_model_grid(volume: ImageVolume, model_input: ModelInput) -> ImageVolume:
    """Resample any native-grid volume (e.g. a ground-truth mask as float) to the model grid."""
    return resample_onto(volume, model_input.grid)


def to_native_grid(
    probability: npt.NDArray[np.float32], model_input: ModelInput, native: ImageVolume
) -> npt.NDArray[np.float32]:
    """Bring a model-grid probability map (slices, rows, columns) back to the native grid."""
    prob = model_input.grid.with_voxels(probability.astype(np.float32))
    return resample_onto(prob, native).voxels


__all__ = [
    "ModelGrid",
    "ModelInput",
    "model_grid_for",
    "resample_to_model_grid",
    "to_model_input",
    "to_native_grid",
]
