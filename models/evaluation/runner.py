"""Evaluate a model bundle on case folders with ground truth, through the service's own code.

Each case folder has the layout ``strokeseg phantom`` writes
(:mod:`models.synth.cases`), which converted public data sets can follow too::

    CASE/dicom/*.dcm          the study as the scanner sent it
    CASE/truth/mask.npy       bool (slices, rows, columns) on the DWI grid
    CASE/truth/truth.json     optional; "domain" or "manufacturer" names the vendor

The study is read with ``service.intake.load_study``, segmented with
``service.inference.segment_lesion`` and checked by ``service.assess.assess``
(the restricted-diffusion guard with the service's default limits), the calls
``service.pipeline`` makes, so the numbers describe what PACS would receive,
not a re-implementation of the preprocessing.  ``guard=False`` scores the
network's raw mask instead (to measure what the guard adds).  The truth is compared on the native DWI grid.

One bad case must not cost a whole evaluation run: a case whose truth cannot
be read, whose study the intake refuses, or whose truth grid does not match
the DWI is logged and recorded as a :class:`CaseFailure` in the caller's
``failures`` list, and the run goes on.  A model that cannot be loaded
(:class:`service.errors.ModelError`) still raises: no case could succeed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from models.casefolder import (
    dicom_files,
    mask_path,
    truth_mask,
    truth_record,
    vendor_of,
)
from models.evaluation.metrics import CaseMetrics, case_metrics

logger = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class CaseFailure:
    """A case that could not be evaluated; ``stage`` is where it failed.

    ``stage`` is ``"truth"`` (mask.npy / truth.json unreadable), ``"intake"``
    (the service refused or could not read the study), ``"inference"`` (the
    preprocessing refused it) or ``"grid"`` (truth and prediction shapes
    differ).  ``reason`` is the operator-readable message.
    """

    case: str
    case_dir: Path
    stage: str
    reason: str


@dataclass(frozen=True, slots=True)
class _Truth:
    vendor: str
    record: dict[str, Any]


def _read_truth(case_dir: Path) -> _Truth:
    """The case's truth record and vendor; raises OSError/ValueError when unusable."""
    if mask_path(case_dir) is None:
        raise FileNotFoundError(f"{case_dir}: no truth/mask.npy or truth/mask.nii.gz")
    record = truth_record(case_dir)
    return _Truth(vendor=vendor_of(record), record=record)


def evaluate_case_dirs(
    model_dir: Path,
    case_dirs: Sequence[Path],
    *,
    threads: int = 0,
    progress: bool = True,
    failures: list[CaseFailure] | None = None,
    min_lesion_voxels: int = 1,
    stream: TextIO | None = None,
    guard: bool = True,
) -> list[CaseMetrics]:
    """Segment every case in ``case_dirs`` with the bundle in ``model_dir`` and score it.

    The model is loaded once (``threads`` = ONNX Runtime intra-op threads,
    0 = its default).  Cases that cannot be evaluated are appended to
    ``failures`` when given (pass an empty list and report it: a run that
    silently dropped its hardest cases would flatter the model) and are
    always logged as warnings.  With ``progress`` one line per case (case,
    vendor, truth and predicted mL, Dice, or the failure) goes to ``stream``
    (stdout by default).  Returns the metrics of the evaluated cases, in
    input order.  ``extra`` of each result holds the intake and inference
    seconds and, for phantoms, the generator's lesion class.
    """
    from service.assess import AssessOptions, RestrictionLimits, assess
    from service.errors import StudyRefused
    from service.inference import load_model, segment_lesion
    from service.intake import load_study
    from service.preprocess import HARMONISING_PROFILES, brain_mask

    out = stream if stream is not None else sys.stdout
    model = load_model(Path(model_dir), intra_op_threads=threads)
    options = AssessOptions(
        restriction=RestrictionLimits(enabled=guard),
        harmonised=model.card.preprocessing_profile in HARMONISING_PROFILES,
    )
    results: list[CaseMetrics] = []

    def fail(case_dir: Path, stage: str, reason: str) -> None:
        logger.warning("case %s not evaluated (%s): %s", case_dir.name, stage, reason)
        if failures is not None:
            failures.append(
                CaseFailure(case=case_dir.name, case_dir=case_dir, stage=stage, reason=reason)
            )
        if progress:
            print(f"{case_dir.name:<16} FAILED ({stage}): {reason}", file=out, flush=True)

    for case_dir in map(Path, case_dirs):
        try:
            truth = _read_truth(case_dir)
        except (OSError, ValueError) as exc:
            fail(case_dir, "truth", f"{type(exc).__name__}: {exc}")
            continue
        started = time.perf_counter()
        try:
            study = load_study(dicom_files(case_dir))
        except StudyRefused as exc:
            fail(case_dir, "intake", exc.reason)
            continue
        intake_s = time.perf_counter() - started
        started = time.perf_counter()
        try:
            network = segment_lesion(study, model)
            assessment = assess(study, network, brain_mask(study.dwi), options)
            segmentation = assessment.segmentation
        except StudyRefused as exc:
            fail(case_dir, "inference", exc.reason)
            continue
        inference_s = time.perf_counter() - started
        try:
            mask = truth_mask(case_dir, study.dwi)
        except (OSError, ValueError) as exc:
            fail(case_dir, "grid", f"{type(exc).__name__}: {exc}")
            continue
        metrics = case_metrics(
            segmentation.mask,
            mask,
            study.dwi.voxel_volume_ml,
            case=case_dir.name,
            vendor=truth.vendor,
            min_lesion_voxels=min_lesion_voxels,
            extra={
                "intake_s": round(intake_s, 3),
                "inference_s": round(inference_s, 3),
                "phantom_lesion_class": truth.record.get("lesion_class"),
                "territory": truth.record.get("territory"),
                "subject": truth.record.get("subject"),
                "validity": assessment.validity.status,
                "validity_reasons": list(assessment.validity.reasons),
                "mimic_volume_ml": round(sum(m.volume_ml for m in assessment.mimics), 3),
            },
        )
        results.append(metrics)
        if progress:
            print(
                f"{metrics.case:<16} {metrics.vendor:<10} "
                f"truth {metrics.truth_volume_ml:8.2f} mL "
                f"pred {metrics.predicted_volume_ml:8.2f} mL Dice {metrics.dice:.3f}",
                file=out,
                flush=True,
            )
    logger.info(
        "evaluated %d of %d cases with %s %s",
        len(results),
        len(case_dirs),
        model.card.name,
        model.card.version,
    )
    return results
