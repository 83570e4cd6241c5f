"""Evaluate a model bundle on fresh phantom studies, end to end through the service.

Each study is generated, written as DICOM, read back with
``service.intake.load_study`` and segmented with
``service.inference.segment_lesion`` (the calls ``service.pipeline`` makes),
then compared with the truth mask on the native DWI grid.  Used by
tests/test_model_quality.py and to fill the ``metrics`` of the model card,
so the numbers on the card are the numbers the test checks.

    python -m models.evaluation --model models/zoo/unet2d-phantom/0.1.0 --seeds 0-9
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

#: Studies whose truth lesion is at least this large (mL) count for Dice and volume error.
MIN_SCORED_VOLUME_ML = 0.5


def dice_score(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """Dice of two masks; 1.0 when both are empty."""
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / denom


@dataclass(frozen=True, slots=True)
class StudyEvaluation:
    """One phantom study: truth vs the service's answer on the native grid."""

    seed: int
    lesion_class: str
    matrix: int
    n_slices: int
    truth_volume_ml: float
    predicted_volume_ml: float
    dice: float
    volume_rel_error: float  # |pred - truth| / truth; inf when truth is empty and pred is not
    intake_s: float
    inference_s: float  # preprocess + ONNX + back to native grid (segment_lesion)


def evaluate_study(
    seed: int, model: Any, work_dir: Path, *, lesion_class: str | None = None
) -> StudyEvaluation:
    """Generate phantom ``seed``, write it, and run it through intake + inference."""
    from models.synth import generate_phantom, write_phantom_study
    from service.inference import segment_lesion
    from service.intake import load_study

    phantom = generate_phantom(seed, lesion_class=lesion_class)
    case_dir = write_phantom_study(phantom, work_dir / f"seed_{seed:04d}")
    started = time.perf_counter()
    study = load_study(sorted((case_dir / "dicom").glob("*.dcm")))
    intake_s = time.perf_counter() - started
    started = time.perf_counter()
    segmentation = segment_lesion(study, model)
    inference_s = time.perf_counter() - started
    truth = np.load(case_dir / "truth" / "mask.npy")
    if truth.shape != segmentation.mask.shape:
        raise ValueError(f"truth {truth.shape} vs prediction {segmentation.mask.shape}")
    truth_ml = float(truth.sum()) * study.dwi.voxel_volume_ml
    pred_ml = segmentation.lesion_volume_ml
    if truth_ml > 0:
        rel = abs(pred_ml - truth_ml) / truth_ml
    else:
        rel = 0.0 if pred_ml == 0 else float("inf")
    return StudyEvaluation(
        seed=seed,
        lesion_class=phantom.lesion_class.value,
        matrix=phantom.geometry.shape[1],
        n_slices=phantom.geometry.shape[0],
        truth_volume_ml=truth_ml,
        predicted_volume_ml=pred_ml,
        dice=dice_score(segmentation.mask, truth),
        volume_rel_error=rel,
        intake_s=intake_s,
        inference_s=inference_s,
    )


def evaluate_bundle(
    model_dir: Path,
    seeds: list[int],
    work_dir: Path | None = None,
    *,
    threads: int = 0,
    lesion_class: str | None = None,
) -> list[StudyEvaluation]:
    """Evaluate the bundle in ``model_dir`` on phantom ``seeds`` (use seeds < 1000).

    ``lesion_class`` forces the phantoms' size class (e.g. ``"none"`` to
    measure false positives); by default each seed draws its own.
    """
    from service.inference import load_model

    if any(s >= 1000 for s in seeds):
        logger.warning("seeds >= 1000 may overlap the training phantoms' seed range")
    model = load_model(model_dir, intra_op_threads=threads)
    with tempfile.TemporaryDirectory(prefix="strokeseg-eval-") as tmp:
        root = work_dir or Path(tmp)
        return [
            evaluate_study(seed, model, root / (lesion_class or "any"), lesion_class=lesion_class)
            for seed in seeds
        ]


def summarise(
    results: list[StudyEvaluation], min_volume_ml: float = MIN_SCORED_VOLUME_ML
) -> dict[str, Any]:
    """Median/min Dice and volume error over studies with a lesion >= ``min_volume_ml``."""
    scored = [r for r in results if r.truth_volume_ml >= min_volume_ml]
    empty = [r for r in results if r.truth_volume_ml == 0]
    dices = [r.dice for r in scored]
    errors = [r.volume_rel_error for r in scored]
    return {
        "n_studies": len(results),
        "n_scored": len(scored),
        "min_scored_volume_ml": min_volume_ml,
        "dice_median": float(np.median(dices)) if dices else None,
        "dice_mean": float(np.mean(dices)) if dices else None,
        "dice_min": float(np.min(dices)) if dices else None,
        "volume_rel_error_median": float(np.median(errors)) if errors else None,
        "volume_rel_error_max": float(np.max(errors)) if errors else None,
        "false_positive_ml_in_lesion_free_studies": [r.predicted_volume_ml for r in empty],
        "inference_s_median": float(np.median([r.inference_s for r in results])),
        "inference_s_max": float(np.max([r.inference_s for r in results])),
    }


def card_metrics(
    results: list[StudyEvaluation], lesion_free: list[StudyEvaluation], seeds: str
) -> dict[str, Any]:
    """The ``metrics`` entries of the model card for an evaluation run."""
    s = summarise(results)
    return {
        "evaluation": (
            f"python -m models.evaluation --seeds {seeds} --lesion-free-seeds "
            f"{','.join(str(r.seed) for r in lesion_free)} (native DWI grid, through "
            "service.intake and service.inference; tests/test_model_quality.py)"
        ),
        "test_studies_scored": s["n_scored"],
        "test_min_scored_lesion_ml": s["min_scored_volume_ml"],
        "test_dice_median": round(s["dice_median"], 3),
        "test_dice_min": round(s["dice_min"], 3),
        "test_volume_rel_error_median": round(s["volume_rel_error_median"], 3),
        "test_volume_rel_error_max": round(s["volume_rel_error_max"], 3),
        "test_dice_lesions_below_0_5_ml": [
            round(r.dice, 3) for r in results if 0 < r.truth_volume_ml < MIN_SCORED_VOLUME_ML
        ],
        "test_false_positive_ml_lesion_free": [
            round(r.predicted_volume_ml, 3) for r in lesion_free
        ],
        "inference_seconds_median": round(s["inference_s_median"], 2),
    }


def _parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a model bundle on phantom studies")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument(
        "--lesion-free-seeds", default="", help="extra seeds forced lesion-free (false positives)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write per-study results + summary as JSON")
    parser.add_argument("--card-metrics", type=Path, help="write the model card's metrics JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = evaluate_bundle(args.model, _parse_seeds(args.seeds), threads=args.threads)
    lesion_free = (
        evaluate_bundle(
            args.model, _parse_seeds(args.lesion_free_seeds), threads=args.threads,
            lesion_class="none",
        )
        if args.lesion_free_seeds
        else []
    )
    for r in results + lesion_free:
        print(
            f"seed {r.seed:4d} {r.lesion_class:6s} {r.matrix:3d}x{r.n_slices:2d} "
            f"truth {r.truth_volume_ml:7.2f} mL pred {r.predicted_volume_ml:7.2f} mL "
            f"Dice {r.dice:.3f} vol err {r.volume_rel_error:6.1%} "
            f"intake {r.intake_s:.2f} s inference {r.inference_s:.2f} s"
        )
    summary = summarise(results)
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "summary": summary,
                    "studies": [asdict(r) for r in results],
                    "lesion_free_studies": [asdict(r) for r in lesion_free],
                },
                indent=2,
            )
            + "\n"
        )
    if args.card_metrics:
        args.card_metrics.write_text(
            json.dumps(card_metrics(results, lesion_free, args.seeds), indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
