"""Derive stage: turn a lesion mask and its volume into DICOM objects for PACS.

* :func:`build_lesion_seg` -- the mask as a BINARY SEG in the source study;
* :func:`build_volume_report` -- the volume as a TID 1500 Comprehensive 3D SR
  referencing that SEG; :func:`read_lesion_volume_ml` reads it back;
* :func:`write_results` -- both, from source files to files in an output
  folder, as :class:`service.domain.ResultObject` for the delivery stage.

Everything here is pure construction from typed inputs; nothing talks to the
network or the database.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from service.derive.algorithm import (
    AlgorithmInfo,
    algorithm_identification_sequence,
    sr_algorithm_identification,
)
from service.derive.concepts import (
    DEFAULT_DEVICE_SERIAL_NUMBER,
    DEFAULT_MANUFACTURER,
    DEFAULT_SOFTWARE_VERSION,
    INFARCT,
    MILLILITER,
    stable_uid,
)
from service.derive.part10 import save_atomically
from service.derive.seg import build_lesion_seg
from service.derive.sr import build_volume_report, read_lesion_volume_ml
from service.domain import ResultObject

__all__ = [
    "AlgorithmInfo",
    "algorithm_identification_sequence",
    "sr_algorithm_identification",
    "build_lesion_seg",
    "build_volume_report",
    "read_lesion_volume_ml",
    "write_results",
    "save_atomically",
    "stable_uid",
    "INFARCT",
    "MILLILITER",
    "DEFAULT_MANUFACTURER",
    "DEFAULT_SOFTWARE_VERSION",
    "DEFAULT_DEVICE_SERIAL_NUMBER",
]

logger = logging.getLogger(__name__)


def _read_headers(source_paths: Sequence[Path]) -> list[Dataset]:
    """Source headers without pixel data: highdicom 0.28 needs none, and a
    60-slice DWI series then costs kilobytes instead of megabytes."""
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in source_paths]


def write_results(
    source_paths: Sequence[Path],
    mask: npt.NDArray[np.bool_] | npt.NDArray[np.integer[Any]],
    lesion_volume_ml: float,
    algorithm: AlgorithmInfo,
    out_dir: Path,
    *,
    manufacturer: str = DEFAULT_MANUFACTURER,
    software_version: str = DEFAULT_SOFTWARE_VERSION,
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    seg_series_number: int = 9901,
    sr_series_number: int = 9902,
    seg_series_instance_uid: str | None = None,
    seg_sop_instance_uid: str | None = None,
    sr_series_instance_uid: str | None = None,
    sr_sop_instance_uid: str | None = None,
) -> list[ResultObject]:
    """Build the SEG and the SR and save them as ``out_dir/SEG_<uid>.dcm`` / ``SR_<uid>.dcm``.

    ``mask[i]`` lies on the image in ``source_paths[i]``.  Both objects are
    built before either is written, so a construction error leaves nothing
    behind; each file appears atomically.  Give the four UIDs (e.g. from
    :func:`stable_uid` with the job key) to make a re-run overwrite the same
    files and let PACS replace rather than duplicate the objects.

    Returns ``[SEG, SR]`` as :class:`ResultObject`.

    Raises
    ------
    ValueError
        On inconsistent inputs: see :func:`build_lesion_seg` and
        :func:`build_volume_report`; also when the mask is empty but the volume
        is not zero, or the other way round (a unit or wiring mistake).
    """
    mask_arr = np.asarray(mask)
    volume = float(lesion_volume_ml)
    if bool(mask_arr.any()) != (volume > 0.0):
        raise ValueError(
            f"mask is {'non-empty' if mask_arr.any() else 'empty'} but lesion_volume_ml "
            f"is {volume}; they must agree on whether there is a lesion"
        )
    if len(source_paths) == 0:
        raise ValueError("at least one source image path is required")
    sources = _read_headers(source_paths)

    seg = build_lesion_seg(
        sources,
        mask_arr,
        algorithm=algorithm,
        series_number=seg_series_number,
        manufacturer=manufacturer,
        software_version=software_version,
        device_serial_number=device_serial_number,
        series_instance_uid=seg_series_instance_uid,
        sop_instance_uid=seg_sop_instance_uid,
    )
    sr = build_volume_report(
        seg,
        sources,
        volume,
        algorithm=algorithm,
        series_number=sr_series_number,
        manufacturer=manufacturer,
        software_version=software_version,
        device_serial_number=device_serial_number,
        series_instance_uid=sr_series_instance_uid,
        sop_instance_uid=sr_sop_instance_uid,
    )

    results: list[ResultObject] = []
    for kind, ds in (("SEG", seg), ("SR", sr)):
        path = save_atomically(ds, Path(out_dir) / f"{kind}_{ds.SOPInstanceUID}.dcm")
        results.append(
            ResultObject(
                kind=kind,
                path=path,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
            )
        )
    logger.info(
        "wrote derived objects",
        extra={
            "study_instance_uid": str(seg.StudyInstanceUID),
            "seg_sop_instance_uid": results[0].sop_instance_uid,
            "sr_sop_instance_uid": results[1].sop_instance_uid,
        },
    )
    return results
