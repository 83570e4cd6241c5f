"""Encode a phantom as classic MR Image Storage files, the way scanners send DWI.

One study, one frame of reference, two series:

* the diffusion series holds both the b=0 and the b=1000 trace images (as
  Siemens, GE and Philips send them), told apart by DiffusionBValue
  (0018,9087), DiffusionDirectionality (0018,9075), ImageType value 4
  (NONE / TRACEW) and, as older software does, the vendor's private b-value
  element;
* the ADC series: DERIVED\\PRIMARY\\DIFFUSION\\ADC, uint16 in 1e-6 mm2/s, on
  the same grid, referencing its source images.

Files are explicit VR little endian with a proper preamble and file meta, and
pass dicom3tools ``dciodvfy`` without errors (see tests/test_phantom.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from models.synth.geometry import format_ds
from models.synth.phantom import PhantomStudy

logger = logging.getLogger(__name__)

IMPLEMENTATION_VERSION_NAME = "STROKESEG_PH01"
DWI_SERIES_NUMBER = 5
ADC_SERIES_NUMBER = 6

#: Where each vendor (also) stores the b-value, as (group, creator, offset, VR).
_PRIVATE_B_VALUE: dict[str, tuple[int, str, int, str]] = {
    "SIEMENS": (0x0019, "SIEMENS MR HEADER", 0x0C, "IS"),
    "GE MEDICAL SYSTEMS": (0x0043, "GEMS_PARM_01", 0x39, "IS"),
    "Philips Medical Systems": (0x2001, "Philips Imaging DD 001", 0x03, "FL"),
}


@dataclass(frozen=True, slots=True)
class _ImageSpec:
    kind: str  # "b0" | "b1000" | "adc"
    slice_index: int
    instance_number: int
    sop_instance_uid: str


def _uid(seed: int, what: str) -> str:
    return str(generate_uid(entropy_srcs=["strokeseg-phantom", str(seed), what]))


def _slice_order(study: PhantomStudy) -> list[int]:
    n = study.geometry.shape[0]
    order = list(range(n))
    return order[::-1] if study.acquisition.descending_slices else order


def _image_specs(study: PhantomStudy) -> Iterator[_ImageSpec]:
    order = _slice_order(study)
    n = len(order)
    for base, kind in ((0, "b0"), (n, "b1000")):
        for i, k in enumerate(order):
            yield _ImageSpec(kind, k, base + i + 1, _uid(study.seed, f"dwi-{kind}-{k}"))
    for i, k in enumerate(order):
        yield _ImageSpec("adc", k, i + 1, _uid(study.seed, f"adc-{k}"))


def _window(pixels: npt.NDArray[np.uint16]) -> tuple[str, str]:
    lo, hi = np.percentile(pixels, [1.0, 99.5])
    return format_ds((lo + hi) / 2.0), format_ds(max(hi - lo, 1.0))


def _base_dataset(study: PhantomStudy, spec: _ImageSpec) -> Dataset:
    ident = study.identity
    acq = study.acquisition
    geo = study.geometry
    is_adc = spec.kind == "adc"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = UID(spec.sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = (
        ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        if is_adc
        else ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW" if spec.kind == "b1000" else "NONE"]
    )
    ds.InstanceCreationDate = ident.study_date
    ds.InstanceCreationTime = ident.study_time
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = spec.sop_instance_uid
    ds.StudyDate = ident.study_date
    ds.SeriesDate = ident.study_date
    ds.AcquisitionDate = ident.study_date
    ds.ContentDate = ident.study_date
    ds.StudyTime = ident.study_time
    ds.SeriesTime = ident.study_time
    ds.AcquisitionTime = ident.study_time
    ds.ContentTime = ident.study_time
    ds.AccessionNumber = ident.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = acq.manufacturer
    ds.InstitutionName = "STROKESEG PHANTOM HOSPITAL"
    ds.ReferringPhysicianName = "REFERRER^PHANTOM"
    ds.StationName = "PHANTOMMR"
    ds.StudyDescription = "MR HEAD STROKE"
    ds.SeriesDescription = "ep2d_diff_ADC" if is_adc else "ep2d_diff_trace"
    ds.ManufacturerModelName = acq.model_name
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.patient_birth_date
    ds.PatientSex = ident.patient_sex
    ds.BodyPartExamined = "HEAD"
    ds.ScanningSequence = "EP"
    ds.SequenceVariant = ["SK", "SP"]
    ds.ScanOptions = ["PFP", "FS"]
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = {"b0": "*ep_b0", "b1000": "*ep_b1000t", "adc": "*ep_b0_1000"}[spec.kind]
    ds.AngioFlag = "N"
    ds.SliceThickness = format_ds(geo.slice_thickness)
    ds.RepetitionTime = format_ds(acq.repetition_time_ms)
    ds.EchoTime = format_ds(acq.echo_time_ms)
    ds.NumberOfAverages = format_ds(acq.number_of_averages)
    ds.ImagingFrequency = format_ds(42.577478 * acq.field_strength_t)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = format_ds(acq.field_strength_t)
    ds.SpacingBetweenSlices = format_ds(geo.slice_spacing)
    ds.EchoTrainLength = str(acq.echo_train_length)
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = format_ds(acq.pixel_bandwidth_hz)
    ds.DeviceSerialNumber = "0000"
    ds.SoftwareVersions = "strokeseg-phantom 1"
    ds.ProtocolName = "ep2d_diff_3scan_trace"
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.FlipAngle = "90"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ident.study_instance_uid
    ds.SeriesInstanceUID = (
        ident.adc_series_instance_uid if is_adc else ident.dwi_series_instance_uid
    )
    ds.StudyID = ident.study_id
    ds.SeriesNumber = str(ADC_SERIES_NUMBER if is_adc else DWI_SERIES_NUMBER)
    ds.AcquisitionNumber = "1"
    ds.InstanceNumber = str(spec.instance_number)
    position = geo.position(spec.slice_index)
    ds.ImagePositionPatient = [format_ds(v) for v in position]
    ds.ImageOrientationPatient = [format_ds(v) for v in (*geo.row_cosine, *geo.column_cosine)]
    ds.FrameOfReferenceUID = ident.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = format_ds(float(np.dot(position, geo.slice_cosine)))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geo.shape[1]
    ds.Columns = geo.shape[2]
    ds.PixelSpacing = [format_ds(v) for v in geo.pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if is_adc else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    return ds


def _add_diffusion(
    ds: Dataset, study: PhantomStudy, b_value: float, *, standard_tags: bool
) -> None:
    if standard_tags:
        ds.DiffusionBValue = float(b_value)
        ds.DiffusionDirectionality = "NONE" if b_value == 0 else "ISOTROPIC"
    private = _PRIVATE_B_VALUE.get(study.acquisition.manufacturer)
    if private is None:
        return
    group, creator, offset, vr = private
    block = ds.private_block(group, creator, create=True)
    if study.acquisition.manufacturer == "GE MEDICAL SYSTEMS":
        # GE: b-value (plus 1e9 on some software) \ 3 further ints.
        block.add_new(offset, vr, [str(int(b_value)), "8", "0", "0"])
    elif vr == "FL":
        block.add_new(offset, vr, float(b_value))
    else:
        block.add_new(offset, vr, str(int(b_value)))


def phantom_datasets(
    study: PhantomStudy, *, standard_diffusion_tags: bool = True
) -> Iterator[Dataset]:
    """Yield every DICOM dataset of the study (b0, b1000, then ADC images).

    ``standard_diffusion_tags=False`` omits (0018,9087)/(0018,9075) and leaves
    only the vendor's private b-value, as older scanner software does.
    """
    windows = {"b0": _window(study.b0), "b1000": _window(study.dwi)}
    pixels = {"b0": study.b0, "b1000": study.dwi, "adc": study.adc}
    source_uids = {
        (kind, k): _uid(study.seed, f"dwi-{kind}-{k}")
        for kind in ("b0", "b1000")
        for k in range(study.geometry.shape[0])
    }
    for spec in _image_specs(study):
        ds = _base_dataset(study, spec)
        if spec.kind == "adc":
            ds.WindowCenter = "1000"
            ds.WindowWidth = "2000"
            ds.DerivationDescription = "ADC = -ln(S1000/S0)/1000 from the trace-weighted images"
            sources = []
            for kind in ("b0", "b1000"):
                item = Dataset()
                item.ReferencedSOPClassUID = MRImageStorage
                item.ReferencedSOPInstanceUID = source_uids[(kind, spec.slice_index)]
                sources.append(item)
            ds.SourceImageSequence = Sequence(sources)
        else:
            ds.WindowCenter, ds.WindowWidth = windows[spec.kind]
            _add_diffusion(
                ds, study, 0.0 if spec.kind == "b0" else study.b_value,
                standard_tags=standard_diffusion_tags,
            )
        frame = np.ascontiguousarray(pixels[spec.kind][spec.slice_index], dtype="<u2")
        ds.PixelData = frame.tobytes()
        ds["PixelData"].VR = "OW"
        yield ds


def write_dicom_files(
    study: PhantomStudy, folder: Path, *, standard_diffusion_tags: bool = True
) -> list[Path]:
    """Write all images of ``study`` into ``folder``; returns the file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in phantom_datasets(study, standard_diffusion_tags=standard_diffusion_tags):
        kind = "ADC" if ds.SeriesNumber == ADC_SERIES_NUMBER else "DWI"
        path = folder / f"{kind}_{int(ds.SeriesNumber):03d}_{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.debug("wrote %d DICOM files to %s", len(paths), folder)
    return paths
