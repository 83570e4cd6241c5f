"""Model-grid training arrays made by the *service's* intake and preprocessing.

"What is trained is what is served": every training study is read from its
DICOM files with :func:`service.intake.load_study` and normalised/resampled
with :func:`service.preprocess.to_model_input`, exactly as at inference.  The
ground-truth mask (native DWI grid) goes to the model grid with
:func:`service.preprocess.resample_to_model_grid` (linear, so targets are
soft at the border).  The result is cached as one ``.npz`` per case, keyed by grid, profile, the case folder and its truth mask,
because reading 200 studies takes minutes, the arrays are fully determined by those
inputs, and cross-validation folds share most of their cases.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.casefolder import dicom_files, mask_path, truth_mask
from service.intake import load_study
from service.preprocess import ModelGrid, resample_to_model_grid, to_model_input

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 3


@dataclass(frozen=True, slots=True, eq=False)
class CaseArrays:
    """All slices of a set of studies on the model grid.

    ``images`` (S, 2, H, W) float16 (DWI, ADC as normalised by the profile),
    ``targets`` (S, H, W) float16 soft lesion masks, ``case_index`` (S,) which
    case each slice belongs to; ``truth_volume_ml`` per case (native grid).
    """

    images: npt.NDArray[np.float16]
    targets: npt.NDArray[np.float16]
    case_index: npt.NDArray[np.int32]
    truth_volume_ml: npt.NDArray[np.float64]
    model_voxel_ml: npt.NDArray[np.float64]
    case_names: tuple[str, ...]

    @property
    def n_cases(self) -> int:
        return len(self.case_names)

    def case_slices(self, case: int) -> npt.NDArray[np.int64]:
        return np.flatnonzero(self.case_index == case)


def study_arrays(
    case_dir: Path, grid: ModelGrid, profile: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float, float]:
    """(input tensor, soft target, truth volume mL, model voxel mL) of one case folder."""
    study = load_study(dicom_files(case_dir))
    model_input = to_model_input(study, grid, profile)
    mask = truth_mask(case_dir, study.dwi)
    target = resample_to_model_grid(study.dwi.with_voxels(mask.astype(np.float32)), model_input)
    truth_ml = float(mask.sum()) * study.dwi.voxel_volume_ml
    return model_input.tensor, target.voxels, truth_ml, model_input.grid.voxel_volume_ml


def _file_digest(path: Path | None) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else ""


def _cache_key(case_dirs: list[Path], grid: ModelGrid, profile: str) -> str:
    record = {
        "version": CACHE_FORMAT_VERSION,
        "grid": [list(grid.matrix), list(grid.pixel_spacing_mm)],
        "profile": profile,
        "cases": [str(p.resolve()) for p in case_dirs],
        # The truth mask changes whenever the generator, the case or its annotation does.
        "truth": [_file_digest(mask_path(p)) for p in case_dirs],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _case_cache_path(cache_dir: Path, case_dir: Path, grid: ModelGrid, profile: str) -> Path:
    """One cached array file per case, keyed like :func:`_cache_key`, so that runs over
    overlapping case sets (cross-validation folds) preprocess each study once."""
    return cache_dir / "cases" / f"{_cache_key([case_dir], grid, profile)}.npz"


def _case_arrays_cached(
    case_dir: Path, grid: ModelGrid, profile: str, cache_dir: Path | None
) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.float16], float, float]:
    path = _case_cache_path(cache_dir, case_dir, grid, profile) if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return z["images"], z["targets"], float(z["truth_ml"]), float(z["voxel_ml"])
    tensor, target, truth_ml, vox_ml = study_arrays(case_dir, grid, profile)
    images = tensor.astype(np.float16)
    targets = np.clip(target, 0.0, 1.0).astype(np.float16)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, targets=targets, truth_ml=truth_ml, voxel_ml=vox_ml)
        tmp.replace(path)
    return images, targets, truth_ml, vox_ml


def load_case_arrays(
    case_dirs: list[Path], grid: ModelGrid, profile: str, cache_dir: Path | None = None
) -> CaseArrays:
    """Arrays of ``case_dirs`` on the model grid, each case from the cache when present."""
    images: list[npt.NDArray[np.float16]] = []
    targets: list[npt.NDArray[np.float16]] = []
    index: list[npt.NDArray[np.int32]] = []
    volumes: list[float] = []
    voxel_ml: list[float] = []
    started = time.perf_counter()
    for i, case_dir in enumerate(case_dirs):
        tensor, target, truth_ml, vox_ml = _case_arrays_cached(case_dir, grid, profile, cache_dir)
        images.append(tensor)
        targets.append(target)
        index.append(np.full(tensor.shape[0], i, dtype=np.int32))
        volumes.append(truth_ml)
        voxel_ml.append(vox_ml)
        if (i + 1) % 20 == 0:
            logger.info(
                "preprocessed %d/%d studies (%.0f s)", i + 1, len(case_dirs),
                time.perf_counter() - started,
            )
    return CaseArrays(
        images=np.concatenate(images),
        targets=np.concatenate(targets),
        case_index=np.concatenate(index),
        truth_volume_ml=np.asarray(volumes),
        model_voxel_ml=np.asarray(voxel_ml),
        case_names=tuple(p.name for p in case_dirs),
    )
