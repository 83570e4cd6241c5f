"""Post-processing rules of a bundle, swept on case folders with truth: the voxel threshold, a
minimum peak probability per predicted component, and a minimum component volume.

Why: on held-out real subjects, small lesions score lowest.  Two different errors pull their
Dice down (models/README.md): a few tiny predicted components elsewhere that recur on the
subject's anatomy (fold F2, F3), and lesions drawn smaller than they are (fold F1).  A single
voxel threshold trades one against the other.  Hysteresis separates them: the outline is
drawn at a low threshold (``probability >= threshold``), but a component counts only if its
*peak* reaches ``peak`` (the network was sure of it somewhere) and, optionally, it is at least
``min_volume_ml``.  The low threshold lets a lesion grow to its rim; the peak removes the
components the network was never sure of.

Rules are chosen honestly in one of two ways:

* on a *calibration* set (validation phantoms and the fold's training subjects), then only
  reported on the *test* set (the held-out subject): ``--calibrate ... --test ...``;
* leave one fold out: each fold's rule is the one with the best mean held-out median Dice on
  the *other* folds' held-out subjects, reported on its own: ``--lofo F1.json F2.json F3.json``.

Each case goes through the service path once (intake, preprocessing, ONNX Runtime with the
card's test-time augmentation); every rule is then applied to that probability map, followed
by the restricted-diffusion guard, as the service does.

Usage::

    python -m models.experiments.component_rules --model BUNDLE \\
        --calibrate runs/ph/val runs/real/S1-siemens-hfs runs/real/S2-philips \\
        --test runs/real/S3-canon --out runs/reports/rules-F3 \\
        --thresholds 0.3 0.4 0.5 --peaks 0 0.8 0.9 --min-volumes 0 0.05
    python -m models.experiments.component_rules --lofo runs/reports/rules-F{1,2,3}/rules.json

Prints one table per set (and per test folder, when there are several) and writes ``rules.json``
(summaries, per-folder summaries and per-case metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from models.casefolder import dicom_files, truth_mask
from models.evaluation.metrics import CaseMetrics, case_metrics
from models.experiments.threshold_sweep import case_dirs

log = logging.getLogger(__name__)

PEAKS = (0.0, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Rule:
    """One post-processing rule: outline threshold, minimum component peak and volume."""

    threshold: float
    peak: float = 0.0
    min_volume_ml: float = 0.0

    @property
    def key(self) -> str:
        return f"t{self.threshold:.2f} p{self.peak:.2f} v{self.min_volume_ml:.3f}"

    @classmethod
    def from_key(cls, key: str) -> Rule:
        t, p, v = key.split()
        return cls(float(t[1:]), float(p[1:]), float(v[1:]))

    def mildness(self, card_threshold: float) -> tuple[float, float, float]:
        """Sort key for ties: the rule closest to the card's threshold with the weakest filters."""
        return (abs(self.threshold - card_threshold), self.peak, self.min_volume_ml)


def apply_rule(probability: np.ndarray, rule: Rule, voxel_ml: float) -> np.ndarray:
    """The mask of ``rule`` on a probability map: hysteresis on the peak, then the volume floor."""
    mask = probability >= rule.threshold
    if not mask.any() or (rule.peak <= rule.threshold and rule.min_volume_ml <= 0):
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    inside = labels[mask]
    peak = np.zeros(n + 1, dtype=np.float64)
    np.maximum.at(peak, inside, probability[mask])
    size = np.bincount(inside, minlength=n + 1) * voxel_ml
    keep = (peak >= rule.peak) & (size >= rule.min_volume_ml)
    keep[0] = False
    kept: np.ndarray = keep[labels]
    return kept


def summarise(metrics: Sequence[CaseMetrics]) -> dict[str, Any]:
    """Median Dice (cases with a lesion), small-lesion Dice, median |volume error|, pooled lesion
    F1 and the largest false-positive volume on lesion-free cases."""
    dices = [m.dice for m in metrics if m.truth_volume_ml > 0]
    small = [m.dice for m in metrics if m.volume_class == "small"]
    free = [m.predicted_volume_ml for m in metrics if m.truth_volume_ml == 0]
    tp, fp, fn = (sum(getattr(m, f"lesion_{k}") for m in metrics) for k in ("tp", "fp", "fn"))
    return {
        "median_dice": statistics.median(dices) if dices else None,
        "median_dice_small": statistics.median(small) if small else None,
        "median_abs_volume_error_ml": statistics.median(m.abs_volume_difference_ml for m in metrics),
        "lesion_tp": tp, "lesion_fp": fp, "lesion_fn": fn,
        "lesion_f1_pooled": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "lesion_free_max_ml": max(free) if free else None,
        "cases": len(metrics), "cases_with_lesion": len(dices),
    }


def by_folder(metrics: Sequence[CaseMetrics]) -> dict[str, dict[str, Any]]:
    """The summary of each case folder's own cases (``extra["folder"]``), in first-seen order.

    A sweep over several test folders pools them; a held-out subject's figure is its own folder
    (or folders), not the pool with phantoms.
    """
    groups: dict[str, list[CaseMetrics]] = {}
    for m in metrics:
        groups.setdefault(str(m.extra.get("folder", "")), []).append(m)
    return {folder: summarise(group) for folder, group in groups.items()}


def sweep(model_dir: Path, cases: list[Path], rules: list[Rule]) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Per rule: the summary, and the per-case metrics (dicts, ``extra["folder"]`` = the case's folder)."""
    from service.assess import AssessOptions, assess
    from service.inference import load_model, segment_lesion
    from service.intake import load_study
    from service.preprocess import HARMONISING_PROFILES, brain_mask

    model = load_model(model_dir, intra_op_threads=2)
    options = AssessOptions(harmonised=model.card.preprocessing_profile in HARMONISING_PROFILES)
    rows: dict[str, list[CaseMetrics]] = {r.key: [] for r in rules}
    for n, case in enumerate(cases, 1):
        study = load_study(dicom_files(case))
        network = segment_lesion(study, model)
        brain = brain_mask(study.dwi)
        truth = truth_mask(case, study.dwi)
        voxel_ml = study.dwi.voxel_volume_ml
        for rule in rules:
            mask = apply_rule(network.probability, rule, voxel_ml)
            candidate = dataclasses.replace(network, mask=mask, lesion_volume_ml=float(mask.sum()) * voxel_ml)
            kept = assess(study, candidate, brain, options).segmentation
            metrics = case_metrics(kept.mask, truth, voxel_ml, case=case.name, vendor="")
            rows[rule.key].append(dataclasses.replace(metrics, extra={"folder": str(case.parent)}))
        if n % 10 == 0:
            log.info("%d/%d cases", n, len(cases))
    summary = {key: summarise(metrics) for key, metrics in rows.items()}
    per_case = {key: [dataclasses.asdict(m) for m in metrics] for key, metrics in rows.items()}
    return summary, per_case


def choose(summaries: Sequence[dict[str, dict[str, Any]]], card_threshold: float) -> str:
    """The rule with the highest mean median Dice (to 3 decimals) over ``summaries``; of equals,
    the mildest (closest to the card's threshold, weakest filters)."""
    keys = set(summaries[0])
    for s in summaries[1:]:
        keys &= set(s)
    if not keys:
        raise ValueError("no rule was swept on every set")

    def score(key: str) -> tuple[float, tuple[float, float, float]]:
        mean = statistics.fmean(s[key]["median_dice"] or 0.0 for s in summaries)
        mildness = Rule.from_key(key).mildness(card_threshold)
        return (round(mean, 3), tuple(-m for m in mildness))  # type: ignore[return-value]

    return max(sorted(keys), key=score)


def leave_one_fold_out(folds: dict[str, dict[str, dict[str, Any]]], card_threshold: float) -> dict[str, dict[str, Any]]:
    """For each fold, the rule chosen on the other folds' held-out summaries and its own result."""
    out: dict[str, dict[str, Any]] = {}
    for name, summary in folds.items():
        others = [s for other, s in folds.items() if other != name]
        key = choose(others, card_threshold)
        out[name] = {"rule": key, "result": summary[key]}
    return out


def fold_name(path: Path) -> str:
    """A fold's name: the folder of a ``rules.json`` (``runs/reports/rules-F1/rules.json`` ->
    ``rules-F1``), otherwise the file's stem (``rules-F1.json`` -> ``rules-F1``)."""
    return path.parent.name if path.name == "rules.json" else path.stem


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print(name: str, summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n{name}\n| rule | median Dice | small | median abs vol err (mL) | lesion F1 (TP/FP/FN) | lesion-free max (mL) |")
    print("|---|---|---|---|---|---|")
    for key, s in summary.items():
        print(f"| {key} | {_fmt(s['median_dice'])} | {_fmt(s['median_dice_small'])} | "
              f"{s['median_abs_volume_error_ml']:.2f} | {_fmt(s['lesion_f1_pooled'], 2)} "
              f"({s['lesion_tp']}/{s['lesion_fp']}/{s['lesion_fn']}) | {_fmt(s['lesion_free_max_ml'], 2)} |")


def _lofo(paths: list[Path], card_threshold: float) -> int:
    folds = {fold_name(p): json.loads(p.read_text())["test"] for p in paths}
    if len(folds) != len(paths) or len(folds) < 2:
        raise SystemExit(f"--lofo needs at least two folds with distinct names, got {sorted(folds)}")
    result = leave_one_fold_out(folds, card_threshold)
    print("| fold | rule chosen on the other folds | median Dice | small | median abs vol err (mL) | lesion F1 (TP/FP/FN) | lesion-free max (mL) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result.items():
        s = r["result"]
        print(f"| {name} | {r['rule']} | {_fmt(s['median_dice'])} | {_fmt(s['median_dice_small'])} | "
              f"{s['median_abs_volume_error_ml']:.2f} | {_fmt(s['lesion_f1_pooled'], 2)} "
              f"({s['lesion_tp']}/{s['lesion_fp']}/{s['lesion_fn']}) | {_fmt(s['lesion_free_max_ml'], 2)} |")
    overall = choose(list(folds.values()), card_threshold)
    print(f"\nchosen on all folds together (for a card): {overall}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="bundle folder")
    parser.add_argument("--calibrate", type=Path, nargs="*", default=[], help="folders that choose the rule")
    parser.add_argument("--test", type=Path, nargs="*", default=[], help="folders only reported on")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--thresholds", type=float, nargs="+", help="outline thresholds (default: the card's)")
    parser.add_argument("--peaks", type=float, nargs="+", default=list(PEAKS), help="minimum component peaks")
    parser.add_argument("--min-volumes", type=float, nargs="+", default=[0.0], help="minimum component volumes (mL)")
    parser.add_argument("--lofo", type=Path, nargs="+", help="rules.json of each fold: leave-one-fold-out choice")
    parser.add_argument("--card-threshold", type=float, default=0.5, help="the served threshold (ties, --lofo)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.lofo:
        return _lofo(args.lofo, args.card_threshold)
    if args.model is None or args.out is None:
        parser.error("--model and --out are required (or --lofo)")
    from service.inference import load_model_card

    card_threshold = load_model_card(args.model).threshold
    thresholds = args.thresholds or [card_threshold]
    rules = [Rule(t, p, v) for t in thresholds for p in args.peaks for v in args.min_volumes]
    document: dict[str, Any] = {"model": str(args.model), "card_threshold": card_threshold}
    if args.calibrate:
        calibration, _ = sweep(args.model, case_dirs(args.calibrate), rules)
        _print("calibration: " + " ".join(map(str, args.calibrate)), calibration)
        chosen = choose([calibration], card_threshold)
        print(f"\nchosen on calibration: {chosen}")
        document |= {"chosen": chosen, "calibration": calibration}
    if args.test:
        test, per_case = sweep(args.model, case_dirs(args.test), rules)
        _print("test: " + " ".join(map(str, args.test)), test)
        document |= {"test": test, "test_cases": per_case}
        folders: dict[str, dict[str, dict[str, Any]]] = {}
        for key, cases in per_case.items():
            for folder, summary in by_folder([CaseMetrics(**c) for c in cases]).items():
                folders.setdefault(folder, {})[key] = summary
        if len(folders) > 1:
            for folder, summary in folders.items():
                _print(f"test folder: {folder}", summary)
            document["test_per_folder"] = folders
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rules.json").write_text(json.dumps(document, indent=2, default=float))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
