"""Case folders: one annotated study for training or evaluation (docs/training-data.md).

::

    CASE/dicom/...             the study's DICOM files as the scanner or PACS sent them
                               (any name, sub-folders allowed; DWI + ADC, any vendor
                               convention the service accepts)
    CASE/truth/mask.npy        the lesion mask on the DWI grid (slices ascending along
                               the slice normal, as service.intake orders them), or
    CASE/truth/mask.nii.gz     the lesion mask in any orientation and grid (e.g. drawn in
                               ITK-SNAP or 3D Slicer); mapped onto the DWI grid through
                               patient coordinates, nearest neighbour
    CASE/truth/truth.json      optional: "domain" or "manufacturer" (the vendor used to
                               stratify results) and whatever else the source recorded

The phantom generator writes exactly this layout, and a hospital's exported
studies with their annotations fit it unchanged, so one code path trains and
evaluates both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.domain import ImageVolume

MASK_NPY = "mask.npy"
MASK_NIFTI = ("mask.nii.gz", "mask.nii")
UNKNOWN_VENDOR = "unknown"


def truth_dir(case: Path) -> Path:
    return case / "truth"


def mask_path(case: Path) -> Path | None:
    """The case's truth mask file, or None."""
    for name in (MASK_NPY, *MASK_NIFTI):
        path = truth_dir(case) / name
        if path.is_file():
            return path
    return None


def is_case(path: Path) -> bool:
    return (path / "dicom").is_dir() and mask_path(path) is not None


def find_cases(paths: list[Path]) -> list[Path]:
    """Every case folder in ``paths`` (each a case or a folder of cases), sorted per folder.

    Raises ValueError naming a path that holds no case.
    """
    cases: list[Path] = []
    for path in paths:
        if is_case(path):
            cases.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.is_dir() and is_case(p)) if path.is_dir() else []
        if not found:
            raise ValueError(
                f"{path} is neither a case folder nor a folder of case folders "
                "(each needs dicom/ and truth/mask.npy or truth/mask.nii.gz)"
            )
        cases.extend(found)
    return cases


def dicom_files(case: Path) -> list[Path]:
    """All files under ``CASE/dicom`` (names and extensions vary by PACS export)."""
    return sorted(p for p in (case / "dicom").rglob("*") if p.is_file() and not p.name.startswith("."))


def truth_record(case: Path) -> dict[str, Any]:
    path = truth_dir(case) / "truth.json"
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a JSON object")
    return record


def vendor_of(record: dict[str, Any]) -> str:
    return str(record.get("domain") or record.get("manufacturer") or UNKNOWN_VENDOR)


def truth_mask(case: Path, dwi: ImageVolume) -> npt.NDArray[np.bool_]:
    """The lesion mask of ``case`` on the grid of ``dwi`` (the study's high-b volume).

    Raises ValueError when the mask is missing or does not fit the DWI grid.
    """
    path = mask_path(case)
    if path is None:
        raise ValueError(f"{case}: no truth/mask.npy or truth/mask.nii.gz")
    if path.name == MASK_NPY:
        mask = np.load(path, allow_pickle=False)
        if mask.shape != dwi.shape:
            raise ValueError(f"{path}: shape {mask.shape} does not match the DWI grid {dwi.shape}")
        return mask.astype(bool)
    import SimpleITK as sitk

    from service.imaging import as_sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3:
        raise ValueError(f"{path}: a 3-D mask is needed, got {image.GetDimension()}-D")
    reference = as_sitk(dwi)
    resampled = sitk.Resample(
        image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8
    )
    mask = sitk.GetArrayFromImage(resampled) > 0
    if int((sitk.GetArrayFromImage(image) > 0).sum()) and not mask.any():
        raise ValueError(f"{path}: the mask does not overlap the DWI volume (other patient space?)")
    return mask
