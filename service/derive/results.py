"""The derive stage's port: typed values in, DICOM files and :class:`ResultObject` out.

:func:`write_results` is the one entry the pipeline calls::

    write_results(sources, segmentation, findings, algorithm, out_dir, options)

* :class:`DerivationSources` -- what each mask slice lies on (one
  :class:`~service.domain.SourceFrame` per slice: a classic image, a frame of
  an Enhanced MR object or a tile of a Siemens MOSAIC) and, optionally, the
  DWI :class:`~service.domain.ImageVolume` (required for frames and tiles; it
  also supplies the overlay's pixels);
* :class:`LesionMask` -- the binary mask and the lesion volume it stands for,
  checked to agree on whether there is a lesion;
* :class:`~service.derive.findings.LesionFindings` or None -- the numbers the
  SR reports and the overlay prints beyond the volume;
* :class:`~service.derive.algorithm.AlgorithmInfo` -- the model, named in SEG and SR;
* :class:`DeriveOptions` -- equipment, series numbers, fixed UIDs
  (:class:`ResultUIDs`), core-volume cut-offs, the overlay
  (:class:`OverlayOptions`, None: no overlay) and the reports this run supersedes.

Each value is checked when it is built, and :func:`write_results` checks that
they describe the same slices before it reads a pixel; then it builds every
object (SEG, SR, overlay) before writing any, so a construction error leaves
nothing behind, and each file appears atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from service import metrics
from service.derive.algorithm import AlgorithmInfo
from service.derive.concepts import (
    DEFAULT_DEVICE_SERIAL_NUMBER,
    DEFAULT_MANUFACTURER,
    DEFAULT_SOFTWARE_VERSION,
)
from service.derive.findings import LesionFindings
from service.derive.overlay import DEFAULT_OVERLAY_LABEL, build_overlay_series
from service.derive.part10 import save_atomically
from service.derive.references import SliceSources
from service.derive.seg import build_lesion_seg
from service.derive.sr import build_volume_report
from service.domain import (
    DiffusionStudy,
    ImageVolume,
    LesionSegmentation,
    ResultObject,
    SourceFrame,
)

__all__ = [
    "DerivationSources",
    "DeriveOptions",
    "LesionMask",
    "OverlayOptions",
    "ResultUIDs",
    "write_results",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True, eq=False)
class DerivationSources:
    """The DWI slices a result is derived from: ``frames[i]`` is the source of mask slice ``i``.

    ``dwi`` is the DWI volume on the mask's grid.  It is required when the
    slices are frames of a multi-frame object or MOSAIC tiles (the derived
    objects take the slice geometry from it), and it supplies the overlay's
    pixels; without it the overlay shows the source images' pixels after
    their modality LUT.  Build it from a study (:meth:`from_study`) or from
    plain classic image files, one per slice (:meth:`from_paths`).
    """

    frames: tuple[SourceFrame, ...]
    dwi: ImageVolume | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", tuple(self.frames))
        if len(self.frames) == 0:
            raise ValueError("at least one source image is required")
        if self.dwi is not None and self.dwi.shape[0] != len(self.frames):
            raise ValueError(
                f"dwi has {self.dwi.shape[0]} slices but {len(self.frames)} source frames were given"
            )

    @classmethod
    def from_study(cls, study: DiffusionStudy) -> DerivationSources:
        """The high-b DWI slices of ``study`` as intake found them, with the DWI volume."""
        return cls(study.dwi_sources, study.dwi)

    @classmethod
    def from_paths(
        cls, paths: Sequence[Path | str], *, dwi: ImageVolume | None = None
    ) -> DerivationSources:
        """Classic single-frame images, ``paths[i]`` the image of slice ``i``.

        Reads each header's SOP Class and Instance UIDs (nothing else is
        checked here: the SEG builder checks the images when it reads them).
        """
        frames = []
        for path in paths:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
            )
            frames.append(
                SourceFrame(
                    Path(path), str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))
                )
            )
        return cls(tuple(frames), dwi)

    @property
    def paths(self) -> list[Path]:
        """The source file of each slice (a multi-frame object's or a MOSAIC's repeats)."""
        return [Path(frame.path) for frame in self.frames]

    @property
    def classic(self) -> bool:
        """Whether every slice is a classic image of its own (no frame, no tile)."""
        return all(f.frame_number is None and f.mosaic_index is None for f in self.frames)


@dataclass(frozen=True, slots=True, eq=False)
class LesionMask:
    """The lesion mask on the DWI grid and the lesion volume (mL) it stands for.

    ``mask`` is (slices, rows, columns), boolean or 0/1 integers (kept as
    bool); ``lesion_volume_ml`` is 0 exactly when the mask is empty: a
    disagreement is a wiring mistake, refused here rather than written to PACS.
    """

    mask: npt.NDArray[np.bool_]
    lesion_volume_ml: float

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        volume = float(self.lesion_volume_ml)
        if bool(mask.any()) != (volume > 0.0):
            raise ValueError(
                f"mask is {'non-empty' if mask.any() else 'empty'} but lesion_volume_ml "
                f"is {volume}; they must agree on whether there is a lesion"
            )
        if mask.dtype != np.bool_:
            if not np.issubdtype(mask.dtype, np.integer) or not np.isin(mask, (0, 1)).all():
                raise ValueError(f"mask must be boolean (or 0/1 integers), got dtype {mask.dtype}")
            mask = mask.astype(np.bool_)
        if mask.ndim != 3:
            raise ValueError(f"mask must be 3-D (slices, rows, columns), got shape {mask.shape}")
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "lesion_volume_ml", volume)

    @classmethod
    def from_segmentation(cls, segmentation: LesionSegmentation) -> LesionMask:
        """The mask and volume of the model's (assessed) segmentation."""
        return cls(segmentation.mask, segmentation.lesion_volume_ml)


@dataclass(frozen=True, slots=True)
class ResultUIDs:
    """Fixed UIDs for the derived objects (None: a new random UID).

    Give them (e.g. :func:`~service.derive.concepts.stable_uid` of the job
    key) to make a re-run overwrite the same files and let PACS replace rather
    than duplicate the objects; overlay images derive their SOP Instance UIDs
    from ``overlay_series_instance_uid`` and their source slice.
    """

    seg_series_instance_uid: str | None = None
    seg_sop_instance_uid: str | None = None
    sr_series_instance_uid: str | None = None
    sr_sop_instance_uid: str | None = None
    overlay_series_instance_uid: str | None = None


@dataclass(frozen=True, slots=True)
class OverlayOptions:
    """The Secondary Capture overlay series (see :mod:`service.derive.overlay`).

    ``label`` is burned into every image; ``window`` is the DWI display
    window (None: 0.5th to 99.5th percentile of the DWI values).
    """

    label: str = DEFAULT_OVERLAY_LABEL
    window: tuple[float, float] | None = None
    series_number: int = 9903


@dataclass(frozen=True, slots=True)
class DeriveOptions:
    """How the derived objects are written, beyond what they say.

    ``core_volume_cutoffs_ml`` adds the SR's labelled core-volume comparisons
    (needs findings); ``overlay`` None writes no overlay; ``previous_reports``
    are SR files of earlier runs for this study that this one supersedes
    (PredecessorDocumentsSequence).
    """

    manufacturer: str = DEFAULT_MANUFACTURER
    software_version: str = DEFAULT_SOFTWARE_VERSION
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER
    seg_series_number: int = 9901
    sr_series_number: int = 9902
    uids: ResultUIDs = ResultUIDs()
    core_volume_cutoffs_ml: Sequence[float] = ()
    overlay: OverlayOptions | None = None
    previous_reports: Sequence[Path] = ()

    def __post_init__(self) -> None:
        # Tuples, so that a caller's list cannot change a frozen value (and it stays hashable).
        object.__setattr__(
            self, "core_volume_cutoffs_ml", tuple(float(c) for c in self.core_volume_cutoffs_ml)
        )
        object.__setattr__(self, "previous_reports", tuple(Path(p) for p in self.previous_reports))


_DEFAULT_OPTIONS = DeriveOptions()


# ------------------------------------------------------------------------- port


def write_results(
    sources: DerivationSources,
    segmentation: LesionMask,
    findings: LesionFindings | None,
    algorithm: AlgorithmInfo,
    out_dir: Path,
    options: DeriveOptions = _DEFAULT_OPTIONS,
) -> list[ResultObject]:
    """Build the SEG, the SR and optionally the overlay, and save them in ``out_dir``.

    Files: ``SEG_<uid>.dcm``, ``SR_<uid>.dcm`` and, with ``options.overlay``,
    one ``OVERLAY_<uid>.dcm`` per DWI slice.  ``segmentation.mask[i]`` lies on
    ``sources.frames[i]``.  Where the slices are frames of an Enhanced MR
    object the SEG references each frame (ReferencedFrameNumber), the SR lists
    the frames and each overlay image references its frame; where they are
    MOSAIC tiles the SEG carries its own plane positions from ``sources.dwi``
    and references the mosaic at image level, as do SR and overlay.

    ``findings`` (from :func:`~service.derive.findings.compute_lesion_findings`
    on this mask) make the SR report count, per-lesion numbers, ADC, ADC core
    and quality, and the overlay print them.

    Returns ``[SEG, SR, OVERLAY...]`` as :class:`ResultObject` (kind
    ``"SEG"``, ``"SR"``, ``"OVERLAY"``; overlay images in display order).

    Raises
    ------
    ValueError
        On inconsistent inputs (see :func:`build_lesion_seg`,
        :func:`build_volume_report`, :func:`build_overlay_series` and
        :meth:`SliceSources.from_frames`), or when ``findings`` or
        ``sources.dwi`` describe another grid than the mask (wiring
        mistakes); nothing is written then.
    """
    slices = _frames_and_tiles(sources)
    _check_same_grid(sources, segmentation, findings)
    with metrics.stage("sources"):  # the source images' headers the SEG and SR reference
        source_images, voxels = _read_sources(sources, slices, overlay=options.overlay is not None)
    objects = _derived_objects(source_images, voxels, segmentation, findings, algorithm, options)
    with metrics.stage("write"):
        results = [_save(kind, ds, Path(out_dir)) for kind, ds in objects]
    log.info(
        "wrote derived objects",
        extra={
            "study_instance_uid": str(objects[0][1].StudyInstanceUID),
            "seg_sop_instance_uid": results[0].sop_instance_uid,
            "sr_sop_instance_uid": results[1].sop_instance_uid,
            "overlay_images": len(results) - 2,
        },
    )
    return results


# ------------------------------------------------------------------------ steps


def _save(kind: str, ds: Dataset, out_dir: Path) -> ResultObject:
    """Write ``ds`` atomically as ``<kind>_<SOP Instance UID>.dcm``: a re-run with the same
    UIDs replaces the file rather than adding one."""
    return ResultObject.of(kind, save_atomically(ds, out_dir / f"{kind}_{ds.SOPInstanceUID}.dcm"), ds)


def _frames_and_tiles(sources: DerivationSources) -> SliceSources | None:
    """The sources as :class:`SliceSources` when slices are frames or tiles, else None.

    Reads the header of each distinct object once, and checks (in
    :meth:`SliceSources.from_frames`) that every frame lies on its slice of
    the DWI volume.  Classic images go to the builders as a list of headers,
    which they check themselves.
    """
    if sources.classic:
        return None
    headers: dict[str, Dataset] = {}
    for frame in sources.frames:
        if frame.sop_instance_uid not in headers:
            headers[frame.sop_instance_uid] = pydicom.dcmread(frame.path, stop_before_pixels=True)
    return SliceSources.from_frames(sources.frames, headers, sources.dwi)


def _check_same_grid(
    sources: DerivationSources, segmentation: LesionMask, findings: LesionFindings | None
) -> None:
    """Raise ``ValueError`` unless the DWI volume and the findings are of this mask."""
    mask = segmentation.mask
    if sources.dwi is not None and sources.dwi.shape != mask.shape:
        raise ValueError(f"dwi has shape {sources.dwi.shape}, the mask {mask.shape}")
    if findings is None:
        return
    if findings.shape != mask.shape:
        raise ValueError(f"findings are for shape {findings.shape}, the mask is {mask.shape}")
    if findings.voxel_count != int(np.count_nonzero(mask)):
        raise ValueError(
            f"findings count {findings.voxel_count} lesion voxels, the mask "
            f"{int(np.count_nonzero(mask))}; they must describe the same mask"
        )


def _read_sources(
    sources: DerivationSources, slices: SliceSources | None, *, overlay: bool
) -> tuple[Sequence[Dataset] | SliceSources, npt.NDArray[np.float64] | None]:
    """What the builders take as source images, and the overlay's DWI values.

    Headers without pixel data where the pixels are not needed (highdicom 0.28
    needs none, and a 60-slice DWI series then costs kilobytes instead of
    megabytes); the overlay's values come from the DWI volume when there is
    one, else from the classic sources' pixels after their modality LUT.
    """
    voxels: npt.NDArray[np.float64] | None = None
    if overlay and sources.dwi is not None:
        voxels = np.asarray(sources.dwi.voxels, dtype=np.float64)
    if slices is not None:
        return slices, voxels
    if overlay and voxels is None:
        datasets: list[Dataset] = [pydicom.dcmread(p) for p in sources.paths]
        pixels = [apply_modality_lut(ds.pixel_array, ds) for ds in datasets]
        return datasets, np.stack([np.asarray(p, dtype=np.float64) for p in pixels])
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sources.paths], voxels


def _derived_objects(
    source_images: Sequence[Dataset] | SliceSources,
    voxels: npt.NDArray[np.float64] | None,
    segmentation: LesionMask,
    findings: LesionFindings | None,
    algorithm: AlgorithmInfo,
    options: DeriveOptions,
) -> list[tuple[str, Dataset]]:
    """(kind, dataset) of the SEG, the SR referencing it and the overlay images, in that order."""
    with metrics.stage("seg"):
        seg = _seg(source_images, segmentation, algorithm, options)
    with metrics.stage("sr"):
        sr = _sr(seg, source_images, segmentation, findings, algorithm, options)
    objects: list[tuple[str, Dataset]] = [("SEG", seg), ("SR", sr)]
    if options.overlay is not None:
        assert voxels is not None  # _read_sources reads them when an overlay is asked for
        with metrics.stage("overlay"):
            objects.extend(
                ("OVERLAY", image)
                for image in _overlay_images(
                    source_images, voxels, segmentation, findings, algorithm, options, options.overlay
                )
            )
    return objects


def _seg(source_images: Sequence[Dataset] | SliceSources, segmentation: LesionMask,
         algorithm: AlgorithmInfo, options: DeriveOptions) -> Dataset:
    return build_lesion_seg(
        source_images,
        segmentation.mask,
        algorithm=algorithm,
        series_number=options.seg_series_number,
        manufacturer=options.manufacturer,
        software_version=options.software_version,
        device_serial_number=options.device_serial_number,
        series_instance_uid=options.uids.seg_series_instance_uid,
        sop_instance_uid=options.uids.seg_sop_instance_uid,
    )


def _sr(seg: Dataset, source_images: Sequence[Dataset] | SliceSources, segmentation: LesionMask,
        findings: LesionFindings | None, algorithm: AlgorithmInfo, options: DeriveOptions) -> Dataset:
    return build_volume_report(
        seg,
        source_images,
        segmentation.lesion_volume_ml,
        algorithm=algorithm,
        series_number=options.sr_series_number,
        manufacturer=options.manufacturer,
        software_version=options.software_version,
        device_serial_number=options.device_serial_number,
        series_instance_uid=options.uids.sr_series_instance_uid,
        sop_instance_uid=options.uids.sr_sop_instance_uid,
        findings=findings,
        core_volume_cutoffs_ml=options.core_volume_cutoffs_ml,
        previous_versions=[
            pydicom.dcmread(p, stop_before_pixels=True) for p in options.previous_reports
        ],
    )


def _overlay_images(
    source_images: Sequence[Dataset] | SliceSources,
    voxels: npt.NDArray[np.float64],
    segmentation: LesionMask,
    findings: LesionFindings | None,
    algorithm: AlgorithmInfo,
    options: DeriveOptions,
    overlay: OverlayOptions,
) -> list[hd.sc.SCImage]:
    """The overlay series, as :func:`build_overlay_series` builds it from these options."""
    return build_overlay_series(
        source_images,
        voxels,
        segmentation.mask,
        lesion_volume_ml=segmentation.lesion_volume_ml,
        algorithm=algorithm,
        label=overlay.label,
        findings=findings,
        window=overlay.window,
        series_number=overlay.series_number,
        manufacturer=options.manufacturer,
        software_version=options.software_version,
        device_serial_number=options.device_serial_number,
        series_instance_uid=options.uids.overlay_series_instance_uid,
    )
