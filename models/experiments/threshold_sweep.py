"""Probability threshold of a bundle, swept on case folders with truth: Dice and volume error per threshold.

A served threshold is a calibration, and calibrating on the data one then
reports on is how numbers get flattered.  So this experiment is run on two
kinds of folders: a *calibration* set (held-out phantoms, or subjects the
model was trained on) that picks the threshold, and a *test* set (a subject
no run of the fold saw) on which the chosen threshold is then only reported.
Each case goes through the service path (intake, preprocessing, ONNX Runtime,
the restricted-diffusion guard) once; the network's probability map is
thresholded at every value given.

Usage::

    python -m models.experiments.threshold_sweep --model models/zoo/unet2d-realanat/0.6.1 \\
        --calibrate runs/ph/val --test runs/real/S3-canon --out runs/reports/threshold

Prints one table per set and writes ``threshold.json``.
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

log = logging.getLogger(__name__)

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def case_dirs(folders: list[Path]) -> list[Path]:
    """Case folders (with ``truth/``) under each folder, or the folder itself."""
    out: list[Path] = []
    for folder in folders:
        if (folder / "truth").is_dir():
            out.append(folder)
        else:
            out += sorted(p for p in folder.iterdir() if (p / "truth").is_dir())
    return out


def sweep(model_dir: Path, cases: list[Path], thresholds: tuple[float, ...]) -> dict[float, dict[str, Any]]:
    """Median Dice (cases with a lesion) and median |volume error| per threshold."""
    from service.assess import AssessOptions, assess
    from service.inference import load_model, segment_lesion
    from service.intake import load_study
    from service.preprocess import HARMONISING_PROFILES, brain_mask

    model = load_model(model_dir, intra_op_threads=2)
    options = AssessOptions(harmonised=model.card.preprocessing_profile in HARMONISING_PROFILES)
    per_threshold: dict[float, list[tuple[float | None, float]]] = {t: [] for t in thresholds}
    for n, case in enumerate(cases, 1):
        study = load_study(dicom_files(case))
        network = segment_lesion(study, model)
        brain = brain_mask(study.dwi)
        truth = truth_mask(case, study.dwi)
        for t in thresholds:
            mask = network.probability >= t
            candidate = dataclasses.replace(
                network, mask=mask, lesion_volume_ml=float(mask.sum()) * study.dwi.voxel_volume_ml
            )
            kept = assess(study, candidate, brain, options).segmentation
            m = case_metrics(kept.mask, truth, study.dwi.voxel_volume_ml, case=case.name, vendor="")
            dice = m.dice if m.truth_volume_ml > 0 else None
            per_threshold[t].append((dice, abs(m.predicted_volume_ml - m.truth_volume_ml)))
        if n % 10 == 0:
            log.info("%d/%d cases", n, len(cases))
    summary: dict[float, dict[str, Any]] = {}
    for t, rows in per_threshold.items():
        dices = [d for d, _ in rows if d is not None]
        summary[t] = {
            "median_dice": statistics.median(dices) if dices else None,
            "median_abs_volume_error_ml": statistics.median(e for _, e in rows),
            "cases": len(rows),
            "cases_with_lesion": len(dices),
        }
    return summary


def _print(name: str, summary: dict[float, dict[str, Any]]) -> None:
    print(f"\n{name}\n| threshold | median Dice | median abs volume error (mL) |\n|---|---|---|")
    for t, s in summary.items():
        print(f"| {t:.2f} | {s['median_dice']:.3f} | {s['median_abs_volume_error_ml']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bundle folder")
    parser.add_argument("--calibrate", type=Path, nargs="+", required=True,
                        help="folders that choose the threshold")
    parser.add_argument("--test", type=Path, nargs="*", default=[], help="folders only reported on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    thresholds = tuple(args.thresholds)
    calibration = sweep(args.model, case_dirs(args.calibrate), thresholds)
    _print("calibration: " + " ".join(map(str, args.calibrate)), calibration)
    chosen = max(thresholds, key=lambda t: (calibration[t]["median_dice"] or 0.0, -abs(t - 0.5)))
    print(f"\nchosen on calibration: {chosen:.2f}")
    document: dict[str, Any] = {"model": str(args.model), "chosen": chosen,
                                "calibration": {str(t): s for t, s in calibration.items()}}
    if args.test:
        test = sweep(args.model, case_dirs(args.test), thresholds)
        _print("test: " + " ".join(map(str, args.test)), test)
        print(f"\nat the chosen {chosen:.2f}: median Dice {test[chosen]['median_dice']:.3f}, "
              f"median abs volume error {test[chosen]['median_abs_volume_error_ml']:.2f} mL")
        document["test"] = {str(t): s for t, s in test.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threshold.json").write_text(json.dumps(document, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
