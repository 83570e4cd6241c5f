"""Real healthy scans at higher b-values: what the service reports where there is no stroke.

The outside testers' worst false positives were at b=2000-2500 (issue 9), and our real scans
are b=1000 and b=1500.  Each scan is read by the real intake, then re-derived in memory at each
requested b-value (:func:`models.synth.bvalue.at_b_value`: kurtosis physics, the scan's own
noise level) and measured through the service's analysis (``service.pipeline.analyse_study``:
harmonisation, network, restricted-diffusion guard, domain of validity, ADC core), once as
configured and once with the guard off.  Every mL reported is a false positive.

Usage::

    python -m models.experiments.high_b ../shared/realdata/healthy/* \\
        --model models/zoo/unet2d-realanat/0.6.1 --b-values 2000 2500 --out runs/reports/high-b

Prints one line per scan and b-value and writes ``high_b.json`` and ``high_b.md``.  The row at
the scan's own b-value (no simulation) is always included as the reference.

With ``--cases`` (case folders with truth, e.g. lesions inserted into a held-out subject by
``strokeseg insert``) the same b-values are applied to each case and the lesion is scored
(median Dice, median absolute volume error, lesions found) per b-value: does the network still
find a real-anatomy lesion when the scanner's b is not the one it was trained on?

    python -m models.experiments.high_b --cases runs/real/S3-canon \
        --model models/zoo/unet2d-realanat/0.6.1 --b-values 2000 2500 --out runs/reports/high-b-S3
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.casefolder import dicom_files, find_cases, truth_mask
from models.evaluation.metrics import case_metrics
from models.experiments.real_healthy import scan_files
from models.synth.bvalue import TISSUE_KURTOSIS, at_b_value
from service.config import AssessSettings, RestrictionGuardSettings, load_settings
from service.domain import DiffusionStudy
from service.inference import LoadedModel, load_model
from service.intake import load_study
from service.pipeline import analyse_study
from service.preprocess import brain_mask


def measure(study: DiffusionStudy, model: LoadedModel) -> dict[str, Any]:
    """Reported lesion, ADC core and validity, guarded and network alone, for one study."""
    settings = load_settings()
    options = settings.preprocess.profile_options()
    guarded = analyse_study(study, model, options, settings.derive, settings.assess)
    alone = analyse_study(
        study, model, options, settings.derive,
        AssessSettings(restriction=RestrictionGuardSettings(enabled=False)),
    )
    inside = brain_mask(study.dwi)
    validity = guarded.assessment.validity
    return {
        "b_value": study.b_value,
        "brain_median_adc": round(float(np.median(study.adc.voxels[inside])), 1),
        "lesion_ml": round(guarded.assessment.segmentation.lesion_volume_ml, 3),
        "adc_core_ml": round(guarded.findings.adc_core_volume_ml, 3),
        "mimic_ml": round(sum(m.volume_ml for m in guarded.findings.mimics), 3),
        "network_ml": round(alone.assessment.segmentation.lesion_volume_ml, 3),
        "network_core_ml": round(alone.findings.adc_core_volume_ml, 3),
        "validity": validity.status,
        "validity_reasons": list(validity.reasons),
    }


def markdown(rows: list[dict[str, Any]], model_dir: Path, kurtosis: float) -> str:
    lines = [
        f"# Real healthy scans at higher b-values: `{model_dir}`",
        "",
        f"Simulated from each scan's own b-value (`models.synth.bvalue`, tissue kurtosis {kurtosis:g}); "
        "the row at the scan's own b is the real scan.",
        "",
        "| scan | scanner | b (source) | brain median ADC | reported lesion (mL) | ADC core (mL) "
        "| set aside by the guard (mL) | network alone (mL) | validity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        validity = r["validity"] if not r["validity_reasons"] else "outside: " + "; ".join(r["validity_reasons"])
        lines.append(
            f"| {r['scan']} | {r['manufacturer']} | {r['b_value']:g} ({r['source_b_value']:g}) | "
            f"{r['brain_median_adc']:.0f} | {r['lesion_ml']:.2f} | {r['adc_core_ml']:.2f} | "
            f"{r['mimic_ml']:.2f} | {r['network_ml']:.2f} | {validity} |"
        )
    return "\n".join(lines) + "\n"


def b_values_for(source_b: float, requested: list[float]) -> list[float]:
    """The source's own b first (the reference), then every requested b above it."""
    return [source_b, *sorted(b for b in requested if b > source_b)]


def score_cases(cases: list[Path], model: LoadedModel, b_values: list[float], kurtosis: float,
                seed: int) -> list[dict[str, Any]]:
    """Dice, volume error and lesions found per case and b-value (the guarded, reported mask)."""
    settings = load_settings()
    options = settings.preprocess.profile_options()
    rows = []
    for case in cases:
        source = load_study(dicom_files(case))
        truth = truth_mask(case, source.dwi)
        for b_new in b_values_for(source.b_value, b_values):
            rng = np.random.default_rng([seed, int(b_new)])
            study = source if b_new == source.b_value else at_b_value(source, b_new, rng, tissue_kurtosis=kurtosis)
            analysis = analyse_study(study, model, options, settings.derive, settings.assess)
            m = case_metrics(analysis.assessment.segmentation.mask, truth, study.dwi.voxel_volume_ml,
                             case=case.name, vendor=source.manufacturer)
            rows.append({"case": case.name, "source_b_value": source.b_value, "b_value": b_new,
                         "truth_ml": m.truth_volume_ml, "predicted_ml": m.predicted_volume_ml,
                         "dice": m.dice, "abs_volume_error_ml": m.abs_volume_difference_ml,
                         "lesion_tp": m.lesion_tp, "lesion_fp": m.lesion_fp, "lesion_fn": m.lesion_fn,
                         "validity": analysis.assessment.validity.status})
        print(f"{case.name}: " + "  ".join(
            f"b={r['b_value']:g} Dice {r['dice']:.3f}" for r in rows if r["case"] == case.name), flush=True)
    return rows


def case_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per b-value (simulated from the cases' own b): medians over the cases with a lesion."""
    summary = []
    for b in sorted({r["b_value"] for r in rows}):
        at_b = [r for r in rows if r["b_value"] == b and r["truth_ml"] > 0]
        if not at_b:
            continue
        tp, fp, fn = (sum(r[k] for r in at_b) for k in ("lesion_tp", "lesion_fp", "lesion_fn"))
        summary.append({
            "b_value": b, "cases_with_lesion": len(at_b),
            "median_dice": round(float(np.median([r["dice"] for r in at_b])), 3),
            "median_abs_volume_error_ml": round(float(np.median([r["abs_volume_error_ml"] for r in at_b])), 3),
            "lesion_tp": tp, "lesion_fp": fp, "lesion_fn": fn,
        })
    return summary


def case_markdown(summary: list[dict[str, Any]], model_dir: Path, kurtosis: float) -> str:
    lines = [
        f"# Inserted lesions at higher b-values: `{model_dir}`",
        "",
        f"Simulated from each case's own b-value (`models.synth.bvalue`, tissue kurtosis {kurtosis:g}).",
        "",
        "| b | cases with lesion | median Dice | median abs volume error (mL) | lesions TP/FP/FN |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(f"| {s['b_value']:g} | {s['cases_with_lesion']} | {s['median_dice']:.3f} | "
                     f"{s['median_abs_volume_error_ml']:.2f} | {s['lesion_tp']}/{s['lesion_fp']}/{s['lesion_fn']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scans", nargs="*", type=Path, help="Healthy scan folders (each with dicom/ or DICOM files).")
    parser.add_argument("--cases", nargs="+", type=Path, default=[],
                        help="Case folders with truth (or folders of them): score the lesion per b-value.")
    parser.add_argument("--model", type=Path, required=True, help="Model bundle folder.")
    parser.add_argument("--out", type=Path, required=True, help="Report folder.")
    parser.add_argument("--b-values", type=float, nargs="+", default=[2000.0, 2500.0],
                        help="b-values to simulate (those below a scan's own are skipped).")
    parser.add_argument("--kurtosis", type=float, default=TISSUE_KURTOSIS, help="Tissue kurtosis.")
    parser.add_argument("--seed", type=int, default=0, help="Noise seed.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.scans and not args.cases:
        parser.error("give healthy scan folders, --cases, or both")
    model = load_model(args.model, intra_op_threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cases:
        case_rows = score_cases(find_cases(args.cases), model, args.b_values, args.kurtosis, args.seed)
        summary = case_summary(case_rows)
        (args.out / "high_b_cases.json").write_text(json.dumps(
            {"model": str(args.model), "kurtosis": args.kurtosis, "seed": args.seed,
             "summary": summary, "cases": case_rows}, indent=2))
        (args.out / "high_b_cases.md").write_text(case_markdown(summary, args.model, args.kurtosis))
        for s in summary:
            print(f"b={s['b_value']:<6g} median Dice {s['median_dice']:.3f}  "
                  f"median abs volume error {s['median_abs_volume_error_ml']:.2f} mL  "
                  f"lesions TP/FP/FN {s['lesion_tp']}/{s['lesion_fp']}/{s['lesion_fn']}", flush=True)
        if not args.scans:
            return 0
    rows = []
    for scan in args.scans:
        source = load_study(scan_files(scan))
        for b_new in b_values_for(source.b_value, args.b_values):
            rng = np.random.default_rng([args.seed, int(b_new)])
            study = source if b_new == source.b_value else at_b_value(source, b_new, rng, tissue_kurtosis=args.kurtosis)
            row = {"scan": scan.name, "manufacturer": source.manufacturer, "source_b_value": source.b_value,
                   **measure(study, model)}
            print(
                f"{row['scan']:<24} b={row['b_value']:<6g} ADC median {row['brain_median_adc']:6.0f}  "
                f"lesion {row['lesion_ml']:7.2f} mL  core {row['adc_core_ml']:6.2f} mL  "
                f"network alone {row['network_ml']:7.2f} mL  {row['validity']}",
                flush=True,
            )
            rows.append(row)
    (args.out / "high_b.json").write_text(json.dumps({"model": str(args.model), "kurtosis": args.kurtosis,
                                                      "seed": args.seed, "rows": rows}, indent=2))
    (args.out / "high_b.md").write_text(markdown(rows, args.model, args.kurtosis))
    worst = max(max(r["lesion_ml"], r["adc_core_ml"]) for r in rows)
    print(f"worst lesion or core volume: {worst:.2f} mL; report in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
