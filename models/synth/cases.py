"""Phantom cases on disk: DICOM beside its ground truth.

Layout (what tests, training and ``strokeseg phantom`` rely on)::

    OUT/case_0000/dicom/*.dcm        DWI (b0 + b1000) and ADC series
    OUT/case_0000/truth/mask.npy     bool (slices, rows, columns) on the DWI grid
    OUT/case_0000/truth/truth.json   volumes, class, geometry, seed, UIDs

``mask[k]`` is the slice whose ImagePositionPatient is
``origin + k * slice_spacing * n`` with ``n = cross(IOP[0:3], IOP[3:6])``,
i.e. slices sorted ascending along the normal; ``mask[k, r, c]`` is pixel
(row r, column c) of that image.  This is how ``service.intake`` orders the
slices of :class:`service.domain.ImageVolume`, whatever the InstanceNumbers.

With a scanner ``domain`` (:mod:`models.synth.domains`) a case is imaged as
that scanner would and written in its vendor's DICOM convention
(:func:`models.synth.vendors.write_vendor_study`); truth.json then also holds
``"domain"``, ``"scanner"`` (the drawn settings) and ``"vendor_convention"``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from models.synth.domains import get_domain
from models.synth.mimics import MimicsArg, mimic_probabilities
from models.synth.mr_image import write_dicom_files
from models.synth.phantom import GENERATOR_VERSION, PhantomStudy, generate_phantom

logger = logging.getLogger(__name__)

TRUTH_FORMAT_VERSION = 1
#: Case seeds derived by :func:`case_seed` are at least this large, so they never
#: collide with the small hand-picked seeds (< 1000) that tests use directly.
DERIVED_SEED_BASE = 1_000_000


def case_seed(seed: int, index: int, domain: str | None = None) -> int:
    """The phantom seed of case ``index`` of a batch started with ``seed``.

    With a scanner ``domain`` the seed also depends on the domain, so domain
    datasets made with the same ``seed`` hold different patients (no lesion
    seen in training on one domain reappears in a test set of another).
    """
    entropy = [int(seed), int(index)]
    if domain is not None:
        entropy.append(zlib.crc32(f"strokeseg-domain-{get_domain(domain).name}".encode()))
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return DERIVED_SEED_BASE + int(state[0] % np.uint64(2**52))


def truth_record(study: PhantomStudy) -> dict[str, Any]:
    """The truth.json content of ``study`` (no patient identifiers beyond the phantom's)."""
    geo = study.geometry
    record: dict[str, Any] = {
        "format_version": TRUTH_FORMAT_VERSION,
        "generator_version": GENERATOR_VERSION,
        "study_instance_uid": study.identity.study_instance_uid,
        "frame_of_reference_uid": study.identity.frame_of_reference_uid,
        "dwi_series_instance_uid": study.identity.dwi_series_instance_uid,
        "adc_series_instance_uid": study.identity.adc_series_instance_uid,
        "seed": study.seed,
        "lesion_class": study.lesion_class.value,
        "lesion_volume_ml": study.lesion_volume_ml,
        "lesion_volume_continuous_ml": study.lesion_volume_continuous_ml,
        "n_lesions": len(study.lesions),
        "lesions": [
            {
                "site": spec.site.value,
                "centre_mni_mm": list(spec.centre_mni_mm),
                "target_volume_ml": spec.target_volume_ml,
                "adc_mm2_s": spec.adc,
                "s0_increase": spec.s0_increase,
            }
            for spec in study.lesions
        ],
        "shape": list(geo.shape),
        "pixel_spacing": list(geo.pixel_spacing),
        "slice_spacing": geo.slice_spacing,
        "slice_thickness": geo.slice_thickness,
        "origin": list(geo.origin),
        "row_cosine": list(geo.row_cosine),
        "column_cosine": list(geo.column_cosine),
        "slice_cosine": list(geo.slice_cosine),
        "voxel_volume_ml": geo.voxel_volume_ml,
        "b_value": study.b_value,
        "manufacturer": study.acquisition.manufacturer,
        "field_strength_t": study.acquisition.field_strength_t,
        "noise_sigma": study.noise_sigma,
        # Lesion mimics in the images (not lesions: the mask is 0 there), for stratifying.
        "mimics": list(study.mimics),
        "mimic_parameters": study.mimic_parameters or {},
    }
    if study.domain is not None:  # default cases keep their truth.json exactly
        record["domain"] = study.domain
        record["scanner"] = study.scanner.as_record() if study.scanner is not None else None
    return record


def write_phantom_study(
    study: PhantomStudy, out_dir: Path, *, standard_diffusion_tags: bool = True
) -> Path:
    """Write ``study`` as ``out_dir/dicom/*.dcm`` + ``out_dir/truth/``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    write_dicom_files(study, out_dir / "dicom", standard_diffusion_tags=standard_diffusion_tags)
    truth_dir = out_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    np.save(truth_dir / "mask.npy", study.mask)
    tmp = truth_dir / "truth.json.tmp"
    tmp.write_text(json.dumps(truth_record(study), indent=2) + "\n")
    os.replace(tmp, truth_dir / "truth.json")
    return out_dir


def _write_case(
    args: tuple[Path, int, int, str | None, str | None, dict[str, float]],
) -> Path:
    out_dir, index, seed, manufacturer, domain, mimics = args
    if domain is None:
        study = generate_phantom(
            case_seed(seed, index), manufacturer=manufacturer,
            patient_name=f"PHANTOM^CASE{index:04d}", mimics=mimics,
        )
        return write_phantom_study(study, out_dir / f"case_{index:04d}")
    return write_domain_case(
        out_dir / f"case_{index:04d}", case_seed(seed, index, domain), domain,
        patient_name=f"PHANTOM^CASE{index:04d}", mimics=mimics,
    )


def write_domain_case(
    out_dir: Path, seed: int, domain: str, *, patient_name: str | None = None,
    mimics: MimicsArg = None,
) -> Path:
    """Generate phantom ``seed`` on scanner ``domain`` and write it in that vendor's convention."""
    from models.synth.vendors import write_vendor_study  # vendors imports this module

    scanner_domain = get_domain(domain)
    study = generate_phantom(
        seed, domain=scanner_domain, patient_name=patient_name, mimics=mimics
    )
    return write_vendor_study(study, Path(out_dir), scanner_domain.convention)


def write_phantom_cases(
    out_dir: Path,
    n_cases: int,
    seed: int,
    *,
    manufacturer: str | None = None,
    workers: int = 1,
    skip_existing: bool = False,
    domain: str | None = None,
    mimics: MimicsArg = None,
) -> list[Path]:
    """Write ``n_cases`` cases ``out_dir/case_0000`` ...; case i uses ``case_seed(seed, i)``.

    With ``skip_existing`` a case whose truth.json exists is kept as is (a
    cache for training, filled once).  ``workers > 1`` uses processes.
    ``domain`` ("A", "B", "C", see :mod:`models.synth.domains`) makes every
    case on that scanner, written in its vendor convention, with case seeds
    ``case_seed(seed, i, domain)``; ``manufacturer`` then must be unset (or the
    domain's).  Without it the cases are exactly as before (Siemens by default).
    ``mimics`` (see :func:`models.synth.mimics.mimic_probabilities`): lesion
    mimics, on by default; ``False`` reproduces generator 1.0's images.
    """
    out_dir = Path(out_dir)
    probabilities = mimic_probabilities(mimics)  # bad names fail before any work
    if domain is not None:
        scanner_domain = get_domain(domain)  # unknown names fail before any work
        if manufacturer is not None and manufacturer != scanner_domain.manufacturer:
            raise ValueError(
                f"domain {scanner_domain.name} is {scanner_domain.manufacturer!r}, "
                f"not {manufacturer!r}"
            )
        domain, manufacturer = scanner_domain.name, None
    elif manufacturer is None:
        manufacturer = "SIEMENS"
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [
        (out_dir, i, seed, manufacturer, domain, probabilities)
        for i in range(n_cases)
        if not (skip_existing and (out_dir / f"case_{i:04d}" / "truth" / "truth.json").exists())
    ]
    if workers > 1 and len(todo) > 1:
        # "spawn", not fork: a caller that already ran SimpleITK, ONNX Runtime or torch has
        # thread pools whose locks a forked child can inherit held (seen: a test run that
        # registered an image with SimpleITK first hung in the child on a futex).
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for path in pool.map(_write_case, todo, chunksize=1):
                logger.info("wrote %s", path)
    else:
        for args in todo:
            logger.info("wrote %s", _write_case(args))
    return [out_dir / f"case_{i:04d}" for i in range(n_cases)]
