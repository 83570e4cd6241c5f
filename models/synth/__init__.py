"""Synthetic acute-stroke diffusion MRI studies (DICOM) with ground truth.

Anatomy comes from the MNI152 2009a tissue maps bundled with nilearn; see
:mod:`models.synth.phantom` for the acquisition and signal model and
:mod:`models.synth.cases` for the on-disk layout.
"""

from models.synth.cases import case_seed, write_phantom_cases, write_phantom_study
from models.synth.lesions import LesionClass
from models.synth.phantom import PhantomStudy, generate_phantom

__all__ = [
    "LesionClass",
    "PhantomStudy",
    "case_seed",
    "generate_phantom",
    "write_phantom_cases",
    "write_phantom_study",
]

# Vendor encodings of a phantom (Siemens CSA/MOSAIC, GE, Philips, Canon, Enhanced MR).
from models.synth.vendors import (  # noqa: E402
    VendorConvention,
    csa_header,
    vendor_datasets,
    write_vendor_study,
)

__all__ += ["VendorConvention", "csa_header", "vendor_datasets", "write_vendor_study"]

# Scanner domains (vendor A/B/C sites) for cross-vendor experiments.
from models.synth.cases import write_domain_case  # noqa: E402
from models.synth.domains import (  # noqa: E402
    DOMAINS,
    ScannerDomain,
    ScannerSettings,
    get_domain,
)
from models.synth.phantom import lesion_plan  # noqa: E402

__all__ += [
    "DOMAINS",
    "ScannerDomain",
    "ScannerSettings",
    "get_domain",
    "lesion_plan",
    "write_domain_case",
]
