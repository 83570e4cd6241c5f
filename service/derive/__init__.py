"""Derive stage: turn a lesion mask and its volume into DICOM objects for PACS.

The port is :func:`write_results` (:mod:`service.derive.results`)::

    write_results(sources, segmentation, findings, algorithm, out_dir, options)

with :class:`DerivationSources` (what each slice lies on, and the DWI volume),
:class:`LesionMask` (mask and lesion volume), :class:`LesionFindings` or None,
:class:`AlgorithmInfo` and :class:`DeriveOptions`; it returns the written
files as :class:`service.domain.ResultObject` for the delivery stage.  The
steps behind it, each usable on its own:

* :func:`compute_lesion_findings` (:mod:`~service.derive.findings`) -- count,
  per-lesion volume/location/class, ADC and quality numbers (numpy/scipy);
* :func:`build_lesion_seg` (:mod:`~service.derive.seg`) -- the mask as a
  BINARY SEG in the source study;
* :func:`build_volume_report` (:mod:`~service.derive.sr`) -- the volume (and,
  given findings, everything else) as a TID 1500 Comprehensive 3D SR
  referencing that SEG; :func:`read_lesion_volume_ml` and
  :func:`read_lesion_findings` read it back;
* :func:`build_overlay_series` (:mod:`~service.derive.overlay`) -- RGB
  Secondary Capture images with the lesion outlined over the DWI, for
  viewers that do not render SEG.

Everything here is pure construction from typed inputs; nothing talks to the
network or the database.  This module only re-exports.
"""

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
from service.derive.results import (
    DerivationSources,
    DeriveOptions,
    LesionMask,
    OverlayOptions,
    ResultUIDs,
    write_results,
)
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

__all__ = [
    # the port
    "write_results",
    "DerivationSources",
    "LesionMask",
    "DeriveOptions",
    "ResultUIDs",
    "OverlayOptions",
    # findings
    "ADC_CORE_THRESHOLD",
    "CORE_VOLUME_CUTOFFS_ML",
    "GridGeometry",
    "Lesion",
    "LesionFindings",
    "VolumeClass",
    "compute_lesion_findings",
    "grid_geometry",
    # the objects, and reading the SR back
    "AlgorithmInfo",
    "algorithm_identification_sequence",
    "sr_algorithm_identification",
    "SliceReference",
    "SliceSources",
    "SourceLayout",
    "build_lesion_seg",
    "build_volume_report",
    "DEFAULT_OVERLAY_LABEL",
    "build_overlay_series",
    "ReportedFindings",
    "ReportedLesion",
    "ReportedMimic",
    "read_lesion_findings",
    "read_lesion_volume_ml",
    # shared leaves
    "save_atomically",
    "stable_uid",
    "INFARCT",
    "MILLILITER",
    "DEFAULT_MANUFACTURER",
    "DEFAULT_SOFTWARE_VERSION",
    "DEFAULT_DEVICE_SERIAL_NUMBER",
]
