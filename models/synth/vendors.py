"""Encode one phantom the way each scanner vendor sends diffusion studies.

:func:`models.synth.mr_image.phantom_datasets` writes the tidy case: classic
images with the standard diffusion attributes.  Real scanners do not.  This
module re-encodes the *same* phantom (same voxels, same geometry, same truth)
in each convention intake must understand, so a test can check that every
encoding yields the same DWI volume, ADC map and slice order:

========================  ==================================================
convention                what it looks like
========================  ==================================================
``standard``              the phantom as :mod:`~models.synth.mr_image` writes it
``siemens_classic``       no (0018,9087); Siemens CSA image header (0029,1010)
                          with ``B_value`` and SIEMENS MR HEADER (0019,100C)
``siemens_xa_classic``    no CSA, no (0018,9087): only (0019,100C) and
                          SequenceName ``*ep_b1000t``
``siemens_mosaic``        one MOSAIC image per b-value (b0, b1000) in one series,
                          CSA ``NumberOfImagesInMosaic``/``SliceNormalVector``,
                          ADC as a MOSAIC too
``ge``                    b0/b1000 interleaved in one series, b-value only in
                          (0043,1039)[0] "GEMS_PARM_01", (0019,10E0) = 0 (trace)
``ge_offset``             as ``ge`` with 1e9 added to (0043,1039)[0]
``philips``               b-value only in (2001,1003) FL; the ADC appended
                          inside the DWI series (stored x2, RescaleSlope
                          0.0005 -> 1e-3 mm2/s, RealWorldValueMapping in mm2/s)
``canon``                 (0018,9087) only on b > 0 images; b0 has none
``canon_comments``        b-value only in ImageComments ``b=1000(...)``
``enhanced``              one Enhanced MR object with b0 + b1000 frames
                          (per-frame MRDiffusionSequence, PlanePosition,
                          DimensionIndexValues), ADC as Enhanced MR with a
                          RealWorldValueMapping in um2/s
``enhanced_classic_adc``  Enhanced MR DWI (Siemens XA) with a classic ADC series
``no_adc``                standard tags, no ADC series at all
``directional_no_adc``    b0 + three orthogonal directional b1000 images per
                          slice, no trace and no ADC (trace = geometric mean)
========================  ==================================================

The truth (``truth/mask.npy`` + ``truth/truth.json``) is written exactly as
:func:`models.synth.cases.write_phantom_study` does, so ``mask[k]`` is still
the slice at ``origin + k * slice_spacing * normal`` whatever the encoding.
All UIDs are re-derived per convention, so two encodings of one phantom can
live in one PACS.  Siemens CSA headers are built by :func:`csa_header` in the
"SV10" layout that :func:`nibabel.nicom.csareader.read` parses.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

from models.synth.cases import truth_record
from models.synth.geometry import format_ds
from models.synth.mr_image import IMPLEMENTATION_VERSION_NAME, phantom_datasets
from models.synth.phantom import PhantomStudy

logger = logging.getLogger(__name__)

ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")


class VendorConvention(enum.StrEnum):
    """How a phantom is encoded (see the module docstring)."""

    STANDARD = "standard"
    SIEMENS_CLASSIC = "siemens_classic"
    SIEMENS_XA_CLASSIC = "siemens_xa_classic"
    SIEMENS_MOSAIC = "siemens_mosaic"
    GE = "ge"
    GE_OFFSET = "ge_offset"
    PHILIPS = "philips"
    CANON = "canon"
    CANON_COMMENTS = "canon_comments"
    ENHANCED = "enhanced"
    ENHANCED_CLASSIC_ADC = "enhanced_classic_adc"
    NO_ADC = "no_adc"
    DIRECTIONAL_NO_ADC = "directional_no_adc"


#: Manufacturer (0008,0070) and model written for each convention.
MANUFACTURERS: dict[VendorConvention, tuple[str, str]] = {
    VendorConvention.STANDARD: ("SIEMENS", "Skyra"),
    VendorConvention.SIEMENS_CLASSIC: ("SIEMENS", "Skyra"),
    VendorConvention.SIEMENS_XA_CLASSIC: ("Siemens Healthineers", "MAGNETOM Vida"),
    VendorConvention.SIEMENS_MOSAIC: ("SIEMENS", "Prisma"),
    VendorConvention.GE: ("GE MEDICAL SYSTEMS", "SIGNA Premier"),
    VendorConvention.GE_OFFSET: ("GE MEDICAL SYSTEMS", "DISCOVERY MR750"),
    VendorConvention.PHILIPS: ("Philips Medical Systems", "Ingenia"),
    VendorConvention.CANON: ("CANON_MEC", "Vantage Orian"),
    VendorConvention.CANON_COMMENTS: ("TOSHIBA_MEC", "Vantage Titan"),
    VendorConvention.ENHANCED: ("Philips Medical Systems", "Ingenia Elition X"),
    VendorConvention.ENHANCED_CLASSIC_ADC: ("Siemens Healthineers", "MAGNETOM Vida"),
    VendorConvention.NO_ADC: ("SIEMENS", "Aera"),
    VendorConvention.DIRECTIONAL_NO_ADC: ("SIEMENS", "Aera"),
}

#: Philips appended ADC: stored = ADC[1e-6 mm2/s] * 2; these map it back.
PHILIPS_ADC_STORED_PER_MICRO = 2
PHILIPS_ADC_RESCALE_SLOPE = 0.0005  # -> 1e-3 mm2/s
PHILIPS_ADC_RWV_SLOPE = 5e-7  # -> mm2/s
#: Directional images: S_d = S_trace * exp(a * w_d), prod_d exp(a * w_d) = 1.
DIRECTIONAL_ANISOTROPY = 0.2
DIRECTIONS: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
DIRECTION_WEIGHTS = (1.0, -0.5, -0.5)


# --------------------------------------------------------------------------
# Siemens CSA header writer


def _csa_item(value: object, vr: str) -> bytes:
    if vr in ("FD", "FL", "DS"):
        text = f"{float(value):.8f}"  # type: ignore[arg-type]
    elif vr in ("IS", "US", "SS", "UL", "SL"):
        text = str(int(value))  # type: ignore[call-overload]
    else:
        text = str(value)
    return text.encode("latin-1") + b"\x00"


def csa_header(elements: Mapping[str, tuple[str, Sequence[object]]]) -> bytes:
    """A Siemens CSA2 ("SV10") header holding ``name -> (VR, values)``.

    Layout (as :func:`nibabel.nicom.csareader.read` reads it): "SV10",
    4 unused bytes, uint32 number of elements, uint32 77; per element a
    64-byte name, int32 VM, 4-byte VR, int32 SyngoDT, int32 number of items,
    int32 77; per item four int32 (length, length, 77, length) then the
    NUL-terminated value padded to 4 bytes.
    """
    out = bytearray(b"SV10\x04\x03\x02\x01")
    out += struct.pack("<2I", len(elements), 77)
    for name, (vr, values) in elements.items():
        items = [_csa_item(v, vr) for v in values]
        out += struct.pack(
            "<64si4s3i", name.encode("latin-1")[:63], len(items), vr.encode("latin-1"),
            3, len(items), 77,
        )
        for data in items:
            out += struct.pack("<4i", len(data), len(data), 77, len(data))
            out += data + b"\x00" * (-len(data) % 4)
    return bytes(out)


def _add_csa(ds: Dataset, elements: Mapping[str, tuple[str, Sequence[object]]]) -> None:
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    block.add_new(0x08, "CS", "IMAGE NUM 4")
    block.add_new(0x09, "LO", "20100114")
    block.add_new(0x10, "OB", csa_header(elements))


# --------------------------------------------------------------------------
# Helpers


@dataclass(slots=True)
class _Image:
    kind: str  # "b0" | "b1000" | "adc"
    k: int  # slice index on the phantom grid (ascending along the normal)
    ds: Dataset


class _Uids:
    """Every UID of the phantom re-derived for one convention (stable per seed)."""

    def __init__(self, study: PhantomStudy, convention: VendorConvention) -> None:
        self._salt = ["strokeseg-vendor", str(study.seed), convention.value]
        self._map: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        if uid not in self._map:
            self._map[uid] = str(generate_uid(entropy_srcs=[*self._salt, uid]))
        return self._map[uid]

    def new(self, what: str) -> str:
        return str(generate_uid(entropy_srcs=[*self._salt, "new", what]))


def _kind(ds: Dataset) -> str:
    image_type = [str(v).upper() for v in ds.ImageType]
    if "ADC" in image_type:
        return "adc"
    return "b1000" if "TRACEW" in image_type else "b0"


def _slice_index(study: PhantomStudy, ds: Dataset) -> int:
    geo = study.geometry
    offset = np.asarray([float(v) for v in ds.ImagePositionPatient]) - np.asarray(geo.origin)
    return int(round(float(offset @ np.asarray(geo.slice_cosine)) / geo.slice_spacing))


def _classic_images(study: PhantomStudy, uids: _Uids, convention: VendorConvention) -> list[_Image]:
    """The phantom's classic images with private elements gone and UIDs re-derived."""
    manufacturer, model = MANUFACTURERS[convention]
    images = []
    for ds in phantom_datasets(study, standard_diffusion_tags=True):
        ds.remove_private_tags()
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
            setattr(ds, keyword, uids(str(getattr(ds, keyword))))
        ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
        for item in ds.get("SourceImageSequence", []):
            item.ReferencedSOPInstanceUID = uids(str(item.ReferencedSOPInstanceUID))
        # A phantom drawn on this vendor's scanner (a domain) keeps its own model name,
        # which matches its field strength; other phantoms get the convention's.
        own = study.acquisition.manufacturer == manufacturer
        ds.Manufacturer = manufacturer
        ds.ManufacturerModelName = study.acquisition.model_name if own else model
        images.append(_Image(_kind(ds), _slice_index(study, ds), ds))
    return images


def _drop(ds: Dataset, *keywords: str) -> None:
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)


def _b_value(kind: str, study: PhantomStudy) -> float:
    return 0.0 if kind == "b0" else float(study.b_value)


def _set_pixels(ds: Dataset, pixels: npt.NDArray[Any], bits_stored: int = 16) -> None:
    frame = np.ascontiguousarray(pixels, dtype="<u2")
    ds.PixelData = frame.tobytes()
    ds["PixelData"].VR = "OW"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1


# --------------------------------------------------------------------------
# Conventions on classic images


def _siemens_classic(study: PhantomStudy, images: list[_Image], *, csa: bool) -> None:
    normal = list(study.geometry.slice_cosine)
    for image in images:
        ds = image.ds
        _drop(ds, "DiffusionBValue", "DiffusionDirectionality")
        elements: dict[str, tuple[str, Sequence[object]]] = {
            "SliceNormalVector": ("FD", normal),
            "ImaCoilString": ("LO", ["HEA;HEP"]),
        }
        if image.kind != "adc":
            b = _b_value(image.kind, study)
            elements["B_value"] = ("IS", [int(b)])
            block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
            block.add_new(0x0C, "IS", str(int(b)))
        if csa:
            _add_csa(ds, elements)


def _ge(study: PhantomStudy, images: list[_Image], *, offset: int) -> None:
    order = {k: i for i, k in enumerate(_acquisition_order(study))}
    for image in images:
        ds = image.ds
        _drop(ds, "DiffusionBValue", "DiffusionDirectionality", "SequenceName")
        if image.kind == "adc":
            ds.ImageType = ["DERIVED", "PRIMARY", "ADC"]
            continue
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        b = int(_b_value(image.kind, study))
        parm = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
        parm.add_new(0x39, "IS", [str(b + offset), "8", "0", "0"])
        acqu = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        acqu.add_new(0xE0, "DS", "0")
        # GE numbers b0 and b-high of one location next to each other.
        ds.InstanceNumber = str(2 * order[image.k] + (1 if image.kind == "b0" else 2))


def _philips(study: PhantomStudy, images: list[_Image]) -> None:
    dwi_series = next(i.ds for i in images if i.kind != "adc")
    n = study.geometry.shape[0]
    for image in images:
        ds = image.ds
        _drop(ds, "DiffusionBValue", "DiffusionDirectionality", "SequenceName")
        block = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
        if image.kind == "adc":
            # Appended inside the DWI series, still carrying the b-value of
            # the trace it came from: only ImageType tells it is an ADC map.
            ds.SeriesInstanceUID = dwi_series.SeriesInstanceUID
            ds.SeriesNumber = dwi_series.SeriesNumber
            ds.SeriesDescription = dwi_series.SeriesDescription
            ds.InstanceNumber = str(2 * n + int(ds.InstanceNumber))
            ds.ImageType = ["DERIVED", "PRIMARY", "ADC", "ADC"]
            block.add_new(0x03, "FL", float(study.b_value))
            block.add_new(0x04, "CS", "I")
            stored = study.adc[image.k].astype(np.uint32) * PHILIPS_ADC_STORED_PER_MICRO
            _set_pixels(ds, stored.astype(np.uint16))
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = format_ds(PHILIPS_ADC_RESCALE_SLOPE)
            ds.RescaleType = "10-3.mm2/s"
            ds.RealWorldValueMappingSequence = DicomSequence([_rwvm(PHILIPS_ADC_RWV_SLOPE, "mm2/s", 65535)])
            continue
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]
        b = _b_value(image.kind, study)
        block.add_new(0x03, "FL", float(b))
        if image.kind == "b1000":
            block.add_new(0x04, "CS", "I")
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "normalized"


def _rwvm(slope: float, unit: str, last: int) -> Dataset:
    item = Dataset()
    item.RealWorldValueFirstValueMapped = 0
    item.RealWorldValueLastValueMapped = last
    item.RealWorldValueIntercept = 0.0
    item.RealWorldValueSlope = float(slope)
    item.LUTExplanation = "ADC"
    item.LUTLabel = "ADC"
    code = Dataset()
    code.CodeValue = unit
    code.CodingSchemeDesignator = "UCUM"
    code.CodeMeaning = unit
    item.MeasurementUnitsCodeSequence = DicomSequence([code])
    return item


def _canon(study: PhantomStudy, images: list[_Image], *, comments: bool) -> None:
    for image in images:
        ds = image.ds
        _drop(ds, "DiffusionDirectionality", "SequenceName")
        if image.kind == "adc":
            continue
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        if image.kind == "b0" or comments:
            _drop(ds, "DiffusionBValue")
        if comments and image.kind == "b1000":
            ds.ImageComments = f"b={int(study.b_value)}(0.000,0.000,0.000)"


def _acquisition_order(study: PhantomStudy) -> list[int]:
    order = list(range(study.geometry.shape[0]))
    return order[::-1] if study.acquisition.descending_slices else order


# --------------------------------------------------------------------------
# Siemens MOSAIC


def _mosaic(study: PhantomStudy, images: list[_Image], uids: _Uids) -> list[_Image]:
    """One MOSAIC per kind; tiles in acquisition order."""
    geo = study.geometry
    n, rows, columns = geo.shape
    grid = math.ceil(math.sqrt(n))
    order = _acquisition_order(study)
    normal = np.asarray(geo.slice_cosine) * (-1.0 if study.acquisition.descending_slices else 1.0)
    first = np.asarray(geo.position(order[0]))
    shift_r = (grid * rows - rows) / 2.0
    shift_c = (grid * columns - columns) / 2.0
    ipp = (
        first
        - shift_r * geo.pixel_spacing[0] * np.asarray(geo.column_cosine)
        - shift_c * geo.pixel_spacing[1] * np.asarray(geo.row_cosine)
    )
    arrays = {"b0": study.b0, "b1000": study.dwi}
    out = []
    for instance, kind in enumerate(("b0", "b1000", "adc"), start=1):
        template = next(i.ds for i in images if i.kind == kind and i.k == order[0])
        ds = copy.deepcopy(template)
        _drop(ds, "DiffusionBValue", "DiffusionDirectionality", "SourceImageSequence")
        ds.SOPInstanceUID = uids.new(f"mosaic-{kind}")
        ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
        ds.InstanceNumber = str(instance if kind != "adc" else 1)
        ds.ImageType = (
            ["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND", "MOSAIC"] if kind == "adc"
            else ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW" if kind == "b1000" else "NONE", "ND", "MOSAIC"]
        )
        pixels = study.adc if kind == "adc" else arrays[kind]
        mosaic = np.zeros((grid * rows, grid * columns), dtype=np.uint16)
        for tile, k in enumerate(order):
            r, c = divmod(tile, grid)
            mosaic[r * rows:(r + 1) * rows, c * columns:(c + 1) * columns] = pixels[k]
        ds.Rows, ds.Columns = mosaic.shape
        _set_pixels(ds, mosaic, 16 if kind == "adc" else 12)
        ds.ImagePositionPatient = [format_ds(v) for v in ipp]
        ds.AcquisitionMatrix = [rows, 0, 0, columns]
        elements: dict[str, tuple[str, Sequence[object]]] = {
            "NumberOfImagesInMosaic": ("US", [n]),
            "SliceNormalVector": ("FD", [float(v) for v in normal]),
            "AcquisitionMatrixText": ("SH", [f"{rows}p*{columns}"]),
        }
        block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        block.add_new(0x0A, "US", n)
        if kind != "adc":
            b = _b_value(kind, study)
            elements["B_value"] = ("IS", [int(b)])
            block.add_new(0x0C, "IS", str(int(b)))
        _add_csa(ds, elements)
        out.append(_Image(kind, order[0], ds))
    return out


# --------------------------------------------------------------------------
# Enhanced MR multi-frame

_COPIED = (
    "SpecificCharacterSet", "StudyDate", "SeriesDate", "ContentDate", "StudyTime",
    "SeriesTime", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
    "AccessionNumber", "Modality", "Manufacturer", "InstitutionName", "ReferringPhysicianName",
    "StationName", "StudyDescription", "ManufacturerModelName", "PatientName", "PatientID",
    "PatientBirthDate", "PatientSex", "BodyPartExamined", "DeviceSerialNumber", "SoftwareVersions",
    "ProtocolName", "PatientPosition", "StudyInstanceUID", "StudyID", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "MagneticFieldStrength", "SeriesInstanceUID", "SeriesNumber",
    "SeriesDescription",
)


def _frame_type_item(frame_type: list[str], contrast: str) -> Dataset:
    item = Dataset()
    item.FrameType = frame_type
    item.PixelPresentation = "MONOCHROME"
    item.VolumetricProperties = "VOLUME"
    item.VolumeBasedCalculationTechnique = "NONE"
    item.ComplexImageComponent = "MAGNITUDE"
    item.AcquisitionContrast = contrast
    return item


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _mr_pulse_sequence(ds: Dataset) -> None:
    """MR Pulse Sequence module of a single-shot spin-echo EPI diffusion sequence."""
    ds.PulseSequenceName = "ep2d_diff"
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "YES"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "FAT"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.NumberOfKSpaceTrajectories = 1
    ds.RectilinearPhaseEncodeReordering = "LINEAR"


def _mr_acquisition_groups(shared: Dataset, study: PhantomStudy, *, original: bool) -> None:
    """The MR functional groups every Enhanced MR frame needs (same for all frames here)."""
    acq = study.acquisition
    head = _item(CodeValue="69536005", CodingSchemeDesignator="SCT", CodeMeaning="Head")
    shared.FrameAnatomySequence = DicomSequence(
        [_item(AnatomicRegionSequence=DicomSequence([head]), FrameLaterality="U")]
    )
    shared.MRAveragesSequence = DicomSequence([_item(NumberOfAverages=float(acq.number_of_averages))])
    shared.MREchoSequence = DicomSequence([_item(EffectiveEchoTime=float(acq.echo_time_ms))])
    shared.MRImagingModifierSequence = DicomSequence([_item(
        MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
        TransmitterFrequency=float(42.577478 * acq.field_strength_t),
        PixelBandwidth=float(acq.pixel_bandwidth_hz),
    )])
    shared.MRModifierSequence = DicomSequence([_item(
        InversionRecovery="NO", FlowCompensation="NONE", T2Preparation="NO",
        SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE",
        PartialFourier="NO", ParallelAcquisition="NO",
    )])
    shared.MRReceiveCoilSequence = DicomSequence([_item(
        ReceiveCoilName="HEAD 20", ReceiveCoilManufacturerName="", ReceiveCoilType="MULTICOIL",
        QuadratureReceiveCoil="NO",
        MultiCoilDefinitionSequence=DicomSequence(
            [_item(MultiCoilElementName="HE1-4", MultiCoilElementUsed="YES")]
        ),
    )])
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([_item(
        RepetitionTime=float(acq.repetition_time_ms), FlipAngle=90.0,
        EchoTrainLength=int(acq.echo_train_length), RFEchoTrainLength=1,
        GradientEchoTrainLength=int(acq.echo_train_length),
        SpecificAbsorptionRateSequence=DicomSequence([_item(
            SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.4,
        )]),
        GradientOutputType="DB_DT", GradientOutput=40.0,
        OperatingModeSequence=DicomSequence([
            _item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL"),
            _item(OperatingModeType="RF", OperatingMode="IEC_NORMAL"),
            _item(OperatingModeType="GRADIENT", OperatingMode="IEC_NORMAL"),
        ]),
    )])
    shared.MRTransmitCoilSequence = DicomSequence([_item(
        TransmitCoilName="BODY", TransmitCoilManufacturerName="", TransmitCoilType="BODY"
    )])
    if original:
        rows, columns = study.geometry.shape[1:]
        shared.MRFOVGeometrySequence = DicomSequence([_item(
            InPlanePhaseEncodingDirection="COLUMN",
            MRAcquisitionFrequencyEncodingSteps=columns,
            MRAcquisitionPhaseEncodingStepsInPlane=rows,
            PercentSampling=100.0, PercentPhaseFieldOfView=100.0,
        )])


def _enhanced(
    study: PhantomStudy,
    template: Dataset,
    frames: list[tuple[str, int]],
    *,
    sop_instance_uid: str,
    adc_rwvm: Dataset | None = None,
) -> Dataset:
    """An Enhanced MR Image object of ``frames`` = [(kind, slice index), ...]."""
    geo = study.geometry
    is_adc = frames[0][0] == "adc"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    for keyword in _COPIED:
        if keyword in template:
            setattr(ds, keyword, copy.deepcopy(template[keyword].value))
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"] if is_adc else ["ORIGINAL", "PRIMARY", "DIFFUSION", "MIXED"]
    ds.InstanceNumber = "1"
    ds.AcquisitionNumber = "1"
    ds.AcquisitionDateTime = f"{template.StudyDate}{template.StudyTime}"
    ds.AcquisitionDuration = 60.0
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "DIFFUSION"
    ds.ImageComments = ""
    ds.AcquisitionContextSequence = DicomSequence([])
    if not is_adc:  # only for ORIGINAL/MIXED objects
        _mr_pulse_sequence(ds)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geo.shape[1]
    ds.Columns = geo.shape[2]
    ds.NumberOfFrames = len(frames)
    ds.PixelRepresentation = 0

    dimension_uid = generate_uid(entropy_srcs=[sop_instance_uid, "dimensions"])
    organization = Dataset()
    organization.DimensionOrganizationUID = dimension_uid
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    ds.DimensionOrganizationType = "3D"
    dimensions = []
    for pointer, group_pointer, label in (
        (0x00209056, 0x00209111, "Stack ID"),
        (0x00209057, 0x00209111, "In-Stack Position Number"),
        (0x00189087, 0x00189117, "Diffusion b-value"),
    ):
        if is_adc and pointer == 0x00189087:
            continue
        item = Dataset()
        item.DimensionOrganizationUID = dimension_uid
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = group_pointer
        item.DimensionDescriptionLabel = label
        dimensions.append(item)
    ds.DimensionIndexSequence = DicomSequence(dimensions)

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [format_ds(v) for v in geo.pixel_spacing]
    measures.SliceThickness = format_ds(geo.slice_thickness)
    measures.SpacingBetweenSlices = format_ds(geo.slice_spacing)
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [format_ds(v) for v in (*geo.row_cosine, *geo.column_cosine)]
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    transformation = Dataset()
    transformation.RescaleIntercept = "0"
    transformation.RescaleSlope = "1"
    transformation.RescaleType = "US"
    shared.PixelValueTransformationSequence = DicomSequence([transformation])
    if adc_rwvm is not None:
        shared.RealWorldValueMappingSequence = DicomSequence([adc_rwvm])
    _mr_acquisition_groups(shared, study, original=not is_adc)
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    pixels = []
    arrays = {"b0": study.b0, "b1000": study.dwi, "adc": study.adc}
    for kind, k in frames:
        item = Dataset()
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1] if is_adc else [1, k + 1, 1 if kind == "b0" else 2]
        content.FrameAcquisitionDateTime = ds.AcquisitionDateTime
        content.FrameReferenceDateTime = ds.AcquisitionDateTime
        content.FrameAcquisitionDuration = 100.0
        item.FrameContentSequence = DicomSequence([content])
        position = Dataset()
        position.ImagePositionPatient = [format_ds(v) for v in geo.position(k)]
        item.PlanePositionSequence = DicomSequence([position])
        if is_adc:
            frame_type = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        else:
            diffusion = Dataset()
            diffusion.DiffusionBValue = _b_value(kind, study)
            diffusion.DiffusionDirectionality = "NONE" if kind == "b0" else "ISOTROPIC"
            item.MRDiffusionSequence = DicomSequence([diffusion])
            frame_type = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE" if kind == "b0" else "TRACEW"]
        item.MRImageFrameTypeSequence = DicomSequence([_frame_type_item(frame_type, "DIFFUSION")])
        per_frame.append(item)
        pixels.append(arrays[kind][k])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _set_pixels(ds, np.stack(pixels), 16 if is_adc else 12)
    return ds


def _enhanced_images(
    study: PhantomStudy, images: list[_Image], uids: _Uids, *, classic_adc: bool
) -> list[_Image]:
    order = _acquisition_order(study)
    dwi_template = next(i.ds for i in images if i.kind == "b0")
    dwi = _enhanced(
        study, dwi_template, [("b0", k) for k in order] + [("b1000", k) for k in order],
        sop_instance_uid=uids.new("enhanced-dwi"),
    )
    out = [_Image("dwi", order[0], dwi)]
    adc_images = [i for i in images if i.kind == "adc"]
    if classic_adc:
        return out + adc_images
    adc = _enhanced(
        study, adc_images[0].ds, [("adc", k) for k in order],
        sop_instance_uid=uids.new("enhanced-adc"),
        adc_rwvm=_rwvm(1.0, "um2/s", 65535),
    )
    return [*out, _Image("adc", order[0], adc)]


# --------------------------------------------------------------------------
# Directional only


def _directional(study: PhantomStudy, images: list[_Image], uids: _Uids) -> list[_Image]:
    """b0 plus one image per direction for each slice; no trace, no ADC."""
    out = [i for i in images if i.kind == "b0"]
    n = study.geometry.shape[0]
    for d, (direction, weight) in enumerate(zip(DIRECTIONS, DIRECTION_WEIGHTS, strict=True)):
        factor = math.exp(DIRECTIONAL_ANISOTROPY * weight)
        for image in images:
            if image.kind != "b1000":
                continue
            ds = copy.deepcopy(image.ds)
            ds.SOPInstanceUID = uids.new(f"direction-{d}-{image.k}")
            ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
            ds.InstanceNumber = str(int(ds.InstanceNumber) + (d + 1) * n)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
            ds.SequenceName = f"*ep_b{int(study.b_value)}#{d + 1}"
            ds.DiffusionDirectionality = "DIRECTIONAL"
            gradient = Dataset()
            gradient.DiffusionGradientOrientation = list(direction)
            ds.DiffusionGradientDirectionSequence = DicomSequence([gradient])
            values = np.clip(np.rint(study.dwi[image.k] * factor), 0, 4095)
            _set_pixels(ds, values.astype(np.uint16), 12)
            out.append(_Image(f"b1000-dir{d + 1}", image.k, ds))
    return out


# --------------------------------------------------------------------------
# Entry points


def directional_images(study: PhantomStudy) -> list[npt.NDArray[np.uint16]]:
    """The stored directional images of ``directional_no_adc`` (for tests)."""
    return [
        np.clip(np.rint(study.dwi * math.exp(DIRECTIONAL_ANISOTROPY * w)), 0, 4095).astype(np.uint16)
        for w in DIRECTION_WEIGHTS
    ]


def vendor_datasets(study: PhantomStudy, convention: VendorConvention | str) -> list[Dataset]:
    """Every DICOM object of ``study`` encoded in ``convention``."""
    convention = VendorConvention(convention)
    uids = _Uids(study, convention)
    images = _classic_images(study, uids, convention)
    if convention is VendorConvention.STANDARD:
        pass
    elif convention is VendorConvention.SIEMENS_CLASSIC:
        _siemens_classic(study, images, csa=True)
    elif convention is VendorConvention.SIEMENS_XA_CLASSIC:
        _siemens_classic(study, images, csa=False)
    elif convention is VendorConvention.SIEMENS_MOSAIC:
        images = _mosaic(study, images, uids)
    elif convention is VendorConvention.GE:
        _ge(study, images, offset=0)
    elif convention is VendorConvention.GE_OFFSET:
        _ge(study, images, offset=1_000_000_000)
    elif convention is VendorConvention.PHILIPS:
        _philips(study, images)
    elif convention is VendorConvention.CANON:
        _canon(study, images, comments=False)
    elif convention is VendorConvention.CANON_COMMENTS:
        _canon(study, images, comments=True)
    elif convention is VendorConvention.ENHANCED:
        images = _enhanced_images(study, images, uids, classic_adc=False)
    elif convention is VendorConvention.ENHANCED_CLASSIC_ADC:
        images = _enhanced_images(study, images, uids, classic_adc=True)
    elif convention is VendorConvention.NO_ADC:
        images = [i for i in images if i.kind != "adc"]
    elif convention is VendorConvention.DIRECTIONAL_NO_ADC:
        images = _directional(study, images, uids)
    return [i.ds for i in images]


def _iter_files(datasets: Sequence[Dataset]) -> Iterator[tuple[str, Dataset]]:
    for ds in datasets:
        yield f"S{int(ds.SeriesNumber):03d}_I{int(ds.InstanceNumber):04d}_{str(ds.SOPInstanceUID)[-8:]}.dcm", ds


def write_vendor_study(
    study: PhantomStudy, out_dir: Path, convention: VendorConvention | str
) -> Path:
    """Write ``study`` in ``convention`` as ``out_dir/dicom/*.dcm`` + ``out_dir/truth/``.

    The truth is the phantom's (same mask, same slice order); truth.json also
    records the convention and the UIDs and manufacturer actually written.
    """
    convention = VendorConvention(convention)
    out_dir = Path(out_dir)
    dicom_dir = out_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    datasets = vendor_datasets(study, convention)
    for name, ds in _iter_files(datasets):
        ds.save_as(dicom_dir / name, enforce_file_format=True)
    truth_dir = out_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    np.save(truth_dir / "mask.npy", study.mask)
    record = truth_record(study)
    first = datasets[0]
    record.update(
        vendor_convention=convention.value,
        manufacturer=MANUFACTURERS[convention][0],
        study_instance_uid=str(first.StudyInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        dwi_series_instance_uid=str(first.SeriesInstanceUID),
        adc_series_instance_uid=next(
            (str(ds.SeriesInstanceUID) for ds in datasets if "ADC" in [str(v).upper() for v in ds.ImageType]),
            None,
        ),
    )
    tmp = truth_dir / "truth.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, truth_dir / "truth.json")
    logger.debug("wrote %s phantom seed %d to %s", convention.value, study.seed, out_dir)
    return out_dir
