"""Synthetic classic MR diffusion images that look like a real scanner's.

Tests of the derived objects (SEG, SR) need source images whose headers are
complete: highdicom copies patient/study attributes from them, so a sloppy
factory would make our outputs look broken to a validator for reasons that
are not ours.  :func:`make_dwi_series` therefore fills every type 1 and type 2
attribute of the MR Image IOD that dciodvfy checks.  :func:`make_sloppy` then
strips what real-world sources sometimes lack, to test that our outputs stay
valid anyway.

Pixel values are a smooth synthetic "head" so that viewers opening the test
files see something plausible; nothing depends on them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["make_dwi_series", "make_sloppy", "write_series", "SLOPPY_MISSING"]

#: Patient/study/equipment attributes a careless sender may leave out.
SLOPPY_MISSING: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "PositionReferenceIndicator",
    "Manufacturer",
    "SpecificCharacterSet",
)


def make_dwi_series(
    n_slices: int = 20,
    rows: int = 64,
    columns: int = 64,
    *,
    pixel_spacing: tuple[float, float] = (3.5, 3.5),
    slice_thickness: float = 5.0,
    slice_gap: float = 0.5,
    b_value: float = 1000.0,
    study_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    seed: int = 0,
) -> list[Dataset]:
    """An axial trace DWI series, slice i at z = i * (thickness + gap), inferior first.

    Returned in slice order with pixel data; InstanceNumber runs 1..n.
    """
    rng = np.random.default_rng(seed)
    study_uid = study_instance_uid or generate_uid()
    series_uid = generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    spacing_z = slice_thickness + slice_gap
    origin_x = -pixel_spacing[1] * (columns - 1) / 2.0
    origin_y = -pixel_spacing[0] * (rows - 1) / 2.0
    origin_z = -spacing_z * (n_slices - 1) / 2.0

    yy, xx = np.mgrid[0:rows, 0:columns]
    cy, cx = (rows - 1) / 2.0, (columns - 1) / 2.0
    datasets: list[Dataset] = []
    for i in range(n_slices):
        z = origin_z + i * spacing_z
        head_radius = 0.42 * min(rows, columns) * np.sqrt(max(0.0, 1 - (2 * i / n_slices - 1) ** 2))
        r = np.hypot(yy - cy, xx - cx)
        img = np.where(r < head_radius, 400.0, 0.0) + rng.normal(20, 5, size=(rows, columns))
        pixels = np.clip(img, 0, 4095).astype(np.uint16)

        ds = Dataset()
        # SOP Common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceCreationDate = "20240301"
        ds.InstanceCreationTime = "101500"
        # Patient
        ds.PatientName = "Test^Synthetic"
        ds.PatientID = "SYNTH0001"
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = "F"
        ds.PatientAge = "074Y"
        # General Study
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240301"
        ds.StudyTime = "101000"
        ds.ReferringPhysicianName = "Referrer^Test"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC0001"
        ds.StudyDescription = "MRI Brain stroke protocol"
        # General Series
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 5
        ds.SeriesDescription = "ep2d_diff_3scan_trace"
        ds.SeriesDate = "20240301"
        ds.SeriesTime = "101200"
        ds.BodyPartExamined = "HEAD"
        ds.PatientPosition = "HFS"
        # Frame of Reference
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        # General Equipment
        ds.Manufacturer = "SIEMENS"
        ds.ManufacturerModelName = "Synthetic"
        ds.InstitutionName = "Synthetic Hospital"
        ds.StationName = "MR1"
        ds.SoftwareVersions = "syngo MR E11"
        ds.DeviceSerialNumber = "12345"
        # General Image
        ds.InstanceNumber = i + 1
        ds.PatientOrientation = ""  # 2C: not required when IOP is present, harmless empty
        ds.ContentDate = "20240301"
        ds.ContentTime = "101230"
        ds.AcquisitionNumber = 1
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"]
        # Image Plane
        ds.PixelSpacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [f"{origin_x:g}", f"{origin_y:g}", f"{z:g}"]
        ds.SliceThickness = f"{slice_thickness:g}"
        ds.SpacingBetweenSlices = f"{spacing_z:g}"
        ds.SliceLocation = f"{z:g}"
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
        # MR Image
        ds.ScanningSequence = "EP"
        ds.SequenceVariant = ["SK", "SP"]
        ds.ScanOptions = "FS"
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "5000"
        ds.EchoTime = "89"
        ds.EchoTrainLength = 1
        ds.ImagingFrequency = "123.2"
        ds.MagneticFieldStrength = "3"
        ds.SequenceName = f"*ep_b{int(b_value)}t"
        ds.DiffusionBValue = float(b_value)
        ds.AcquisitionMatrix = [0, columns, rows, 0]
        ds.InPlanePhaseEncodingDirection = "COL"
        ds.FlipAngle = "90"
        ds.PercentSampling = "100"
        ds.PercentPhaseFieldOfView = "100"
        ds.PixelBandwidth = "1000"
        ds.LossyImageCompression = "00"
        # VOI LUT
        ds.WindowCenter = "300"
        ds.WindowWidth = "600"

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(ds)
    return datasets


def make_sloppy(
    datasets: Sequence[Dataset], missing: Sequence[str] = SLOPPY_MISSING
) -> list[Dataset]:
    """Copies of ``datasets`` without the attributes in ``missing``."""
    out = []
    for ds in datasets:
        c = copy.deepcopy(ds)
        for keyword in missing:
            if keyword in c:
                delattr(c, keyword)
        out.append(c)
    return out


def write_series(datasets: Sequence[Dataset], directory: Path) -> list[Path]:
    """Write each dataset as a Part 10 file; returns the paths in input order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = directory / f"MR{i + 1:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
