"""Derive stage: turn a lesion mask and its volume into DICOM objects for PACS.

* :func:`compute_lesion_findings` -- count, per-lesion volume/location/class,
  ADC and quality numbers as a frozen :class:`LesionFindings` (numpy/scipy);
* :func:`build_lesion_seg` -- the mask as a BINARY SEG in the source study;
* :func:`build_volume_report` -- the volume (and, given findings, everything
  else) as a TID 1500 Comprehensive 3D SR referencing that SEG;
  :func:`read_lesion_volume_ml` and :func:`read_lesion_findings` read it back;
* :func:`build_overlay_series` -- RGB Secondary Capture images with the lesion
  outlined over the DWI, for viewers that do not render SEG;
* :func:`write_results` -- all of them, from source files to files in an
  output folder, as :class:`service.domain.ResultObject` for the delivery stage.

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
from pydicom.pixels import apply_modality_lut

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
from service.derive.findings import (
    ADC_CORE_THRESHOLD,
    CORE_VOLUME_CUTOFFS_ML,
    GridGeometry,
    Lesion,
    LesionFindings,
    VolumeClass,
    compute_lesion_findings,
)
from service.derive.overlay import DEFAULT_OVERLAY_LABEL, build_overlay_series
from service.derive.part10 import save_atomically
from service.derive.references import SliceReference, SliceSources, SourceLayout
from service.derive.seg import build_lesion_seg
from service.derive.sources import grid_geometry
from service.derive.sr import (
    ReportedFindings,
    ReportedLesion,
    ReportedMimic,
    build_volume_report,
    read_lesion_findings,
    read_lesion_volume_ml,
)
from service.domain import ImageVolume, ResultObject, SourceFrame

__all__ = [
    "ADC_CORE_THRESHOLD",
    "CORE_VOLUME_CUTOFFS_ML",
    "DEFAULT_OVERLAY_LABEL",
    "GridGeometry",
    "Lesion",
    "LesionFindings",
    "ReportedFindings",
    "ReportedLesion",
    "ReportedMimic",
    "SliceReference",
    "SliceSources",
    "SourceLayout",
    "VolumeClass",
    "build_overlay_series",
    "compute_lesion_findings",
    "grid_geometry",
    "read_lesion_findings",
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


def _read_dwi(source_paths: Sequence[Path]) -> tuple[list[Dataset], npt.NDArray[np.float64]]:
    """Full sources and their pixels after the modality LUT, for the overlay."""
    datasets: list[Dataset] = [pydicom.dcmread(p) for p in source_paths]
    voxels = np.stack(
        [np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64) for ds in datasets]
    )
    return datasets, voxels


def _frames_and_paths(source_paths: Sequence[Path], sources: Sequence[SourceFrame]) -> list[Path]:
    """The source files of ``sources`` (one per slice), checked against ``source_paths``."""
    paths = [Path(frame.path) for frame in sources]
    if len(source_paths) and [Path(p) for p in source_paths] != paths:
        raise ValueError("source_paths must be the paths of sources, slice for slice (or empty)")
    return paths


def _slice_sources(sources: Sequence[SourceFrame], dwi: ImageVolume | None) -> SliceSources:
    """Headers of the distinct source objects, and which frame/tile each slice is."""
    headers: dict[str, Dataset] = {}
    for frame in sources:
        if frame.sop_instance_uid not in headers:
            headers[frame.sop_instance_uid] = pydicom.dcmread(frame.path, stop_before_pixels=True)
    return SliceSources.from_frames(sources, headers, dwi)


def _check_findings(findings: LesionFindings, mask: npt.NDArray[Any]) -> None:
    if findings.shape != mask.shape:
        raise ValueError(f"findings are for shape {findings.shape}, the mask is {mask.shape}")
    if findings.voxel_count != int(np.count_nonzero(mask)):
        raise ValueError(
            f"findings count {findings.voxel_count} lesion voxels, the mask "
            f"{int(np.count_nonzero(mask))}; they must describe the same mask"
        )


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
    findings: LesionFindings | None = None,
    core_volume_cutoffs_ml: Sequence[float] = (),
    overlay: bool = False,
    overlay_label: str = DEFAULT_OVERLAY_LABEL,
    dwi_voxels: npt.ArrayLike | None = None,
    overlay_window: tuple[float, float] | None = None,
    overlay_series_number: int = 9903,
    overlay_series_instance_uid: str | None = None,
    sources: Sequence[SourceFrame] | None = None,
    dwi: ImageVolume | None = None,
    previous_reports: Sequence[Path] = (),
) -> list[ResultObject]:
    """Build the SEG, the SR and optionally the overlay, and save them in ``out_dir``.

    Files: ``SEG_<uid>.dcm``, ``SR_<uid>.dcm`` and, with ``overlay=True``,
    one ``OVERLAY_<uid>.dcm`` per DWI slice.  ``mask[i]`` lies on the image
    in ``source_paths[i]``.  All objects are built before any is written, so
    a construction error leaves nothing behind; each file appears atomically.
    Give the UIDs (e.g. from :func:`stable_uid` with the job key) to make a
    re-run overwrite the same files and let PACS replace rather than
    duplicate the objects (overlay images derive theirs from
    ``overlay_series_instance_uid``).

    ``findings`` (from :func:`compute_lesion_findings` on this mask) make the
    SR report count, per-lesion numbers, ADC, ADC core and quality, and the
    overlay print them; ``core_volume_cutoffs_ml`` adds the labelled
    core-volume comparisons.  The overlay windows ``dwi_voxels`` (the DWI
    values, slice ``i`` on ``source_paths[i]``) or, when not given, the
    source files' pixels after their modality LUT; ``overlay_label`` is
    burned into every image.

    ``sources`` (``study.dwi_sources``) and ``dwi`` (``study.dwi``) say what
    each slice is when it is not a classic image of its own: a frame of an
    Enhanced MR object (the SEG references it per frame with
    ReferencedFrameNumber, the SR lists the frames, each overlay image
    references its frame) or a tile of a Siemens MOSAIC (the SEG carries its
    own plane positions from ``dwi`` and references the mosaic at image
    level; SR and overlay reference the mosaic).  ``dwi`` is then required;
    it also supplies the overlay's pixels when ``dwi_voxels`` is not given.
    With ``sources``, ``source_paths`` may be empty or must be their paths.
    Classic sources given this way are handled exactly as ``source_paths``.

    Returns ``[SEG, SR, OVERLAY...]`` as :class:`ResultObject` (kind
    ``"SEG"``, ``"SR"``, ``"OVERLAY"``; overlay images in display order).

    Raises
    ------
    ValueError
        On inconsistent inputs: see :func:`build_lesion_seg`,
        :func:`build_volume_report` and :func:`build_overlay_series`; also
        when the mask is empty but the volume is not zero, or the other way
        round, or ``findings`` describe another mask (wiring mistakes).
    """
    mask_arr = np.asarray(mask)
    volume = float(lesion_volume_ml)
    if bool(mask_arr.any()) != (volume > 0.0):
        raise ValueError(
            f"mask is {'non-empty' if mask_arr.any() else 'empty'} but lesion_volume_ml "
            f"is {volume}; they must agree on whether there is a lesion"
        )
    slices: SliceSources | None = None
    if sources is not None:
        source_paths = _frames_and_paths(source_paths, sources)
        if any(f.frame_number is not None or f.mosaic_index is not None for f in sources):
            slices = _slice_sources(sources, dwi)
    if len(source_paths) == 0:
        raise ValueError("at least one source image path is required")
    if dwi is not None and dwi.shape != mask_arr.shape:
        raise ValueError(f"dwi has shape {dwi.shape}, the mask {mask_arr.shape}")
    if findings is not None:
        _check_findings(findings, mask_arr)
    voxels: npt.NDArray[np.float64] | None = None
    if overlay and dwi_voxels is not None:
        voxels = np.asarray(dwi_voxels, dtype=np.float64)
    elif overlay and dwi is not None:
        voxels = np.asarray(dwi.voxels, dtype=np.float64)
    source_images: Sequence[Dataset] | SliceSources
    if slices is not None:
        source_images = slices
    elif overlay and voxels is None:
        source_images, voxels = _read_dwi(source_paths)
    else:
        source_images = _read_headers(source_paths)

    seg = build_lesion_seg(
        source_images,
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
        source_images,
        volume,
        algorithm=algorithm,
        series_number=sr_series_number,
        manufacturer=manufacturer,
        software_version=software_version,
        device_serial_number=device_serial_number,
        series_instance_uid=sr_series_instance_uid,
        sop_instance_uid=sr_sop_instance_uid,
        findings=findings,
        core_volume_cutoffs_ml=core_volume_cutoffs_ml,
        previous_versions=[pydicom.dcmread(p, stop_before_pixels=True) for p in previous_reports],
    )
    objects: list[tuple[str, Dataset]] = [("SEG", seg), ("SR", sr)]
    if overlay:
        assert voxels is not None
        images = build_overlay_series(
            source_images,
            voxels,
            mask_arr,
            lesion_volume_ml=volume,
            algorithm=algorithm,
            label=overlay_label,
            findings=findings,
            window=overlay_window,
            series_number=overlay_series_number,
            manufacturer=manufacturer,
            software_version=software_version,
            device_serial_number=device_serial_number,
            series_instance_uid=overlay_series_instance_uid,
        )
        objects.extend(("OVERLAY", image) for image in images)

    results: list[ResultObject] = []
    for kind, ds in objects:
        path = save_atomically(ds, Path(out_dir) / f"{kind}_{ds.SOPInstanceUID}.dcm")
        results.append(ResultObject.of(kind, path, ds))
    logger.info(
        "wrote derived objects",
        extra={
            "study_instance_uid": str(seg.StudyInstanceUID),
            "seg_sop_instance_uid": results[0].sop_instance_uid,
            "sr_sop_instance_uid": results[1].sop_instance_uid,
            "overlay_images": len(results) - 2,
        },
    )
    return results
