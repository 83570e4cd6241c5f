"""Component rules of a bundle, swept on case folders with truth: keep a predicted lesion only if
the network was sure of it somewhere (its peak probability).

Why: on held-out real subjects, small lesions score lowest, and much of what drags their Dice
down is not the lesion's own outline but a few tiny predicted components elsewhere that recur on
the subject's anatomy (models/README.md, fold F2 and the per-slice Dice runs).  A voxel threshold
cannot tell those from a lesion's rim; a component whose *peak* probability never leaves the
region near the threshold is the network's own doubt.  This is hysteresis thresholding: the
mask is still ``probability >= threshold``, but only the components that reach ``peak`` count.

Like ``threshold_sweep``, a rule is chosen on a *calibration* set (validation phantoms and the
fold's training subjects) and only reported on the *test* set (the held-out subject).  Each case
goes through the service path once (intake, preprocessing, ONNX Runtime with the card's
test-time augmentation, the restricted-diffusion guard).

Usage::

    python -m models.experiments.component_rules --model BUNDLE \\
        --calibrate runs/ph/val runs/real/S1-siemens-hfs runs/real/S2-philips \\
        --test runs/real/S3-canon --out runs/reports/rules-F3

Prints one table per set and writes ``rules.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from models.casefolder import dicom_files, truth_mask
from models.evaluation.metrics import case_metrics
from models.experiments.threshold_sweep import case_dirs

log = logging.getLogger(__name__)

PEAKS = (0.0, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def sweep(model_dir: Path, cases: list[Path], peaks: list[float]) -> dict[float, dict[str, Any]]:
    """Median Dice (cases with a lesion), median |volume error|, pooled lesion F1 and the largest
    false-positive volume on lesion-free cases, per minimum peak probability."""
    from service.assess import AssessOptions, assess
    from service.inference import load_model, segment_lesion
    from service.inference.session import lesion_mask
    from service.intake import load_study
    from service.preprocess import HARMONISING_PROFILES, brain_mask

    model = load_model(model_dir, intra_op_threads=2)
    threshold = model.card.threshold
    options = AssessOptions(harmonised=model.card.preprocessing_profile in HARMONISING_PROFILES)
    rows: dict[float, list[Any]] = {p: [] for p in peaks}
    for n, case in enumerate(cases, 1):
        study = load_study(dicom_files(case))
        network = segment_lesion(study, model)
        brain = brain_mask(study.dwi)
        truth = truth_mask(case, study.dwi)
        voxel_ml = study.dwi.voxel_volume_ml
        for peak in peaks:
            mask = lesion_mask(network.probability, threshold, peak)
            candidate = dataclasses.replace(network, mask=mask, lesion_volume_ml=float(mask.sum()) * voxel_ml)
            kept = assess(study, candidate, brain, options).segmentation
            rows[peak].append(case_metrics(kept.mask, truth, voxel_ml, case=case.name, vendor=""))
        if n % 10 == 0:
            log.info("%d/%d cases", n, len(cases))
    summary: dict[float, dict[str, Any]] = {}
    for peak, metrics in rows.items():
        dices = [m.dice for m in metrics if m.truth_volume_ml > 0]
        small = [m.dice for m in metrics if m.volume_class == "small"]
        free = [m.predicted_volume_ml for m in metrics if m.truth_volume_ml == 0]
        tp, fp, fn = (sum(getattr(m, f"lesion_{k}") for m in metrics) for k in ("tp", "fp", "fn"))
        summary[peak] = {
            "median_dice": statistics.median(dices) if dices else None,
            "median_dice_small": statistics.median(small) if small else None,
            "median_abs_volume_error_ml": statistics.median(m.abs_volume_difference_ml for m in metrics),
            "lesion_tp": tp, "lesion_fp": fp, "lesion_fn": fn,
            "lesion_f1_pooled": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "lesion_free_max_ml": max(free) if free else None,
            "cases": len(metrics), "cases_with_lesion": len(dices),
        }
    return summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print(name: str, summary: dict[float, dict[str, Any]]) -> None:
    print(f"\n{name}\n| min peak | median Dice | small | median abs vol err (mL) | lesion F1 (TP/FP/FN) | lesion-free max (mL) |")
    print("|---|---|---|---|---|---|")
    for peak, s in summary.items():
        print(f"| {peak:.2f} | {_fmt(s['median_dice'])} | {_fmt(s['median_dice_small'])} | "
              f"{s['median_abs_volume_error_ml']:.2f} | {_fmt(s['lesion_f1_pooled'], 2)} "
              f"({s['lesion_tp']}/{s['lesion_fp']}/{s['lesion_fn']}) | {_fmt(s['lesion_free_max_ml'], 2)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bundle folder")
    parser.add_argument("--calibrate", type=Path, nargs="*", default=[], help="folders that choose the rule")
    parser.add_argument("--test", type=Path, nargs="*", default=[], help="folders only reported on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peaks", type=float, nargs="+", default=list(PEAKS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    peaks = list(args.peaks)
    document: dict[str, Any] = {"model": str(args.model)}
    if args.calibrate:
        calibration = sweep(args.model, case_dirs(args.calibrate), peaks)
        _print("calibration: " + " ".join(map(str, args.calibrate)), calibration)
        # the highest median Dice (to 3 decimals); of equals, the mildest rule
        chosen = max(peaks, key=lambda p: (round(calibration[p]["median_dice"] or 0.0, 3), -p))
        print(f"\nchosen on calibration: min peak {chosen:.2f}")
        document |= {"chosen": chosen, "calibration": {str(p): s for p, s in calibration.items()}}
    if args.test:
        test = sweep(args.model, case_dirs(args.test), peaks)
        _print("test: " + " ".join(map(str, args.test)), test)
        document["test"] = {str(p): s for p, s in test.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rules.json").write_text(json.dumps(document, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
