"""The seeds' cross-vendor experiment on phantom scanner domains, end to end.

    python -m models.experiments.cross_vendor --out runs/cross-vendor

Alis et al. 2020 trained on one vendor, tested on the same vendor (internal)
and on another (external), then fine-tuned on a small target-vendor set; Noh
et al. 2023 also plotted Dice against the number of training studies.  This
script does both on the phantom domains of :mod:`models.synth.domains`, using
only the public ``strokeseg`` commands (phantom, train, finetune, export,
evaluate), so every number in the table comes from a command a reader can
run, and the log lists each one.  Steps whose outputs exist are skipped, so an
interrupted run continues where it stopped.

Outputs in ``--out``: ``data/`` (phantom studies), ``runs/`` (checkpoints),
``bundles/`` (ONNX bundles), ``reports/`` (one evaluate report per model and
test set), ``results.json``, ``results.md`` (the tables for models/README.md)
and ``training_size_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Scale:
    """Sizes of one experiment run (the defaults fit 2 CPU cores in about an hour)."""

    train_cases: int = 60
    test_cases: int = 20
    finetune_cases: int = 6  # ~10 % of the source training set, as in Alis 2020
    finetune_val_cases: int = 2
    curve_sizes: tuple[int, ...] = (6, 18)
    epochs: int = 20
    finetune_epochs: int = 10
    patience: int = 6
    min_steps: int = 15


QUICK = Scale(
    train_cases=6, test_cases=3, finetune_cases=2, finetune_val_cases=1, curve_sizes=(2,),
    epochs=1, finetune_epochs=1, patience=1, min_steps=2,
)

#: Phantom batch seeds (>= 1000: disjoint from the test suite's hand-picked seeds).
TRAIN_SEEDS = {"A": 1101, "B": 1201, "C": 1301}
TEST_SEEDS = {"A": 1102, "B": 1202, "C": 1302}


class Experiment:
    def __init__(
        self, out: Path, scale: Scale, threads: int, workers: int, arch_args: tuple[str, ...] = ()
    ) -> None:
        self.arch_args = arch_args
        self.arch_name = arch_args[1] if arch_args else "unet2d"
        self.out = out
        self.scale = scale
        self.threads = threads
        self.workers = workers
        self.commands: list[str] = []
        self.strokeseg = str(Path(sys.executable).with_name("strokeseg"))

    def run(self, *args: object, creates: Path) -> None:
        """Run one strokeseg command unless ``creates`` already exists."""
        argv = [str(a) for a in args]
        line = "strokeseg " + shlex.join(argv)
        self.commands.append(line)
        if creates.exists():
            print(f"[skip, exists] {line}", flush=True)
            return
        print(f"[run] {line}", flush=True)
        started = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        subprocess.run([self.strokeseg, *argv], check=True, env=env)
        print(f"[done in {time.perf_counter() - started:.0f} s] {line}", flush=True)

    def data(self, domain: str, kind: str, n: int) -> Path:
        seed = (TRAIN_SEEDS if kind == "train" else TEST_SEEDS)[domain]
        path = self.out / "data" / f"{domain}-{kind}"
        self.run(
            "phantom", path, "--cases", n, "--seed", seed, "--domain", domain,
            "--workers", self.workers, creates=path / f"case_{n - 1:04d}" / "truth" / "truth.json",
        )
        return path

    def subset(self, source: Path, name: str, n: int) -> Path:
        """A folder of links to the first ``n`` cases of ``source`` (fine-tuning sets)."""
        path = self.out / "data" / name
        path.mkdir(parents=True, exist_ok=True)
        for case in sorted(p for p in source.iterdir() if p.name.startswith("case_"))[:n]:
            link = path / case.name
            if not link.exists():
                link.symlink_to(case.resolve(), target_is_directory=True)
        return path

    def train(self, name: str, data: Path, *extra: object) -> Path:
        run = self.out / "runs" / name
        s = self.scale
        self.run(
            "train", data, "--out", run, "--epochs", s.epochs, "--patience", s.patience,
            "--min-steps-per-epoch", s.min_steps, "--seed", 0, "--threads", self.threads,
            "--cache-dir", self.out / "cache", "--no-progress", *self.arch_args, *extra,
            creates=run / "training.json",
        )
        return run

    def finetune(self, name: str, source: Path, data: Path) -> Path:
        run = self.out / "runs" / name
        s = self.scale
        self.run(
            "finetune", data, "--from", source / "best.pt", "--out", run,
            "--epochs", s.finetune_epochs, "--patience", s.patience,
            "--min-steps-per-epoch", s.min_steps, "--seed", 0, "--threads", self.threads,
            "--val-fraction", s.finetune_val_cases / (s.finetune_cases + s.finetune_val_cases),
            "--cache-dir", self.out / "cache", "--no-progress",
            creates=run / "training.json",
        )
        return run

    def export(self, name: str, run: Path) -> Path:
        bundle = self.out / "bundles" / name
        self.run(
            "export", run / "best.pt", "--out", bundle, "--name", f"{self.arch_name}-{name}",
            "--version", "0.0.0-experiment", creates=bundle / "SHA256SUMS",
        )
        return bundle

    def evaluate(self, bundle: Path, test: Path, label: str) -> dict[str, Any]:
        report = self.out / "reports" / label
        self.run(
            "evaluate", test, "--model", bundle, "--out", report, "--threads", self.threads,
            creates=report / "report.json",
        )
        return json.loads((report / "report.json").read_text())


def _overall(report: dict[str, Any]) -> dict[str, Any]:
    o = report["summary"]["overall"]
    return {
        "n": o.get("n_with_lesion", o.get("n")),
        "dice_median": o.get("dice_median"),
        "dice_q1": o.get("dice_q1"),
        "dice_q3": o.get("dice_q3"),
        "lesion_f1": o.get("lesion_f1_pooled"),
        "abs_volume_difference_ml_median": o.get("abs_volume_difference_ml_median"),
        "lesion_fp": o.get("lesion_fp"),
        "bland_altman": o.get("bland_altman"),
        "studies_off_by_10ml": sum(
            1 for row in report["cases"] if abs(row["volume_difference_ml"]) > 10.0
        ),
    }


def _by_case(report: dict[str, Any], field: str = "dice") -> dict[str, float]:
    """``field`` of each study with a lesion (Dice, lesion F1, ...), by case name."""
    return {
        row["case"]: row[field] for row in report["cases"] if row["truth_volume_ml"] > 0
    }


def run_experiment(
    out: Path, scale: Scale, threads: int, workers: int, arch_args: tuple[str, ...] = ()
) -> dict[str, Any]:
    from models.evaluation.stats import mann_whitney_u, wilcoxon_signed_rank

    ex = Experiment(out, scale, threads, workers, arch_args)
    s = scale
    train = {d: ex.data(d, "train", s.train_cases) for d in ("A", "B")}
    test = {d: ex.data(d, "test", s.test_cases) for d in ("A", "B", "C")}
    ft_data = {
        d: ex.subset(train[d], f"{d}-finetune-{s.finetune_cases}", s.finetune_cases + s.finetune_val_cases)
        for d in ("A", "B")
    }
    runs = {f"vendor{d}": ex.train(f"vendor{d}", train[d]) for d in ("A", "B")}
    runs["vendorA-ft-B"] = ex.finetune("vendorA-ft-B", runs["vendorA"], ft_data["B"])
    runs["vendorB-ft-A"] = ex.finetune("vendorB-ft-A", runs["vendorB"], ft_data["A"])
    for n in s.curve_sizes:
        runs[f"vendorA-n{n}"] = ex.train(f"vendorA-n{n}", train["A"], "--max-cases", n)
    bundles = {name: ex.export(name, run) for name, run in runs.items()}

    reports: dict[str, dict[str, dict[str, Any]]] = {}
    for name, bundle in bundles.items():
        targets = ("A", "B", "C") if not name.startswith("vendorA-n") else ("A",)
        reports[name] = {d: ex.evaluate(bundle, test[d], f"{name}-on-{d}") for d in targets}

    table = {name: {d: _overall(r) for d, r in by.items()} for name, by in reports.items()}
    tests: dict[str, Any] = {}

    def safe(label: str, fn: Any, a: list[float], b: list[float]) -> None:
        try:
            tests[label] = fn(a, b)
        except ValueError as exc:
            tests[label] = {"error": str(exc)}

    for src, dst in (("A", "B"), ("B", "A")):
        for field, what in (("dice", "Dice"), ("lesion_f1", "lesion F1")):
            internal = list(_by_case(reports[f"vendor{src}"][src], field).values())
            external = _by_case(reports[f"vendor{src}"][dst], field)
            tuned = _by_case(reports[f"vendor{src}-ft-{dst}"][dst], field)
            shared = sorted(set(external) & set(tuned))
            safe(f"{what}: {src}-model internal ({src}) vs external ({dst}), Mann-Whitney U",
                 mann_whitney_u, internal, list(external.values()))
            safe(f"{what}: {src}-model on {dst} before vs after fine-tuning on {dst}, Wilcoxon",
                 wilcoxon_signed_rank, [external[c] for c in shared], [tuned[c] for c in shared])
    training = {
        name: json.loads((run / "training.json").read_text()) for name, run in runs.items()
    }
    curve: list[dict[str, Any]] = [
        {"n_training_studies": training[f"vendorA-n{n}"]["n_training_studies"],
         **table[f"vendorA-n{n}"]["A"]}
        for n in s.curve_sizes
    ] + [{"n_training_studies": training["vendorA"]["n_training_studies"], **table["vendorA"]["A"]}]
    results = {
        "architecture": " ".join(arch_args) or "--arch unet2d",
        "scale": {k: getattr(s, k) for k in s.__slots__},
        "table": table,
        "tests": tests,
        "training_size_curve": curve,
        "training_minutes": {
            name: round(t["seconds"] / 60.0, 1) for name, t in training.items()
        },
        "best_epochs": {name: t["best_epoch"] for name, t in training.items()},
        "commands": ex.commands,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    _curve_png(curve, out / "training_size_curve.png")
    print((out / "results.md").read_text())
    return results


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """Three tables (Dice; lesion detection; volume agreement), the tests, the curve."""
    t = results["table"]
    labels = {
        "vendorA": "A", "vendorB": "B",
        "vendorA-ft-B": "A, fine-tuned on B", "vendorB-ft-A": "B, fine-tuned on A",
    }
    views = {
        "Median Dice [IQR] (studies with a lesion)": lambda r: (
            f"{_f(r['dice_median'])} [{_f(r['dice_q1'])}-{_f(r['dice_q3'])}]"
        ),
        "Lesion-wise F1 (false-positive components, all studies)": lambda r: (
            f"{_f(r['lesion_f1'], 2)} ({r['lesion_fp']})"
        ),
        "Volume: median abs error (mL); Bland-Altman bias [95 % LoA] (mL); studies > 10 mL off": lambda r: (
            f"{_f(r['abs_volume_difference_ml_median'], 2)}; "
            f"{_f((r.get('bland_altman') or {}).get('bias'), 1)} "
            f"[{_f((r.get('bland_altman') or {}).get('loa_low'), 1)}, "
            f"{_f((r.get('bland_altman') or {}).get('loa_high'), 1)}]; {r['studies_off_by_10ml']}"
        ),
    }
    lines: list[str] = []
    for heading, cell in views.items():
        lines += [f"**{heading}**", "", "| trained on | test A | test B | test C |", "|---|---|---|---|"]
        for name, label in labels.items():
            row = [cell(t[name][d]) if d in t[name] else "-" for d in ("A", "B", "C")]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["| test | statistic | p |", "|---|---|---|"]
    for label, r in results["tests"].items():
        if "error" in r:
            lines.append(f"| {label} | - | {r['error']} |")
        else:
            lines.append(f"| {label} | {_f(r['statistic'], 1)} | {r['p_value']:.3g} |")
    lines += ["", "| training studies (vendor A) | median Dice on A [IQR] | median abs volume error (mL) |", "|---|---|---|"]
    for row in results["training_size_curve"]:
        lines.append(
            f"| {row['n_training_studies']} | {_f(row['dice_median'])} "
            f"[{_f(row['dice_q1'])}-{_f(row['dice_q3'])}] | "
            f"{_f(row['abs_volume_difference_ml_median'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def _curve_png(curve: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [row["n_training_studies"] for row in curve]
    ys = [row["dice_median"] or 0.0 for row in curve]
    lo = [row["dice_q1"] or 0.0 for row in curve]
    hi = [row["dice_q3"] or 0.0 for row in curve]
    ax.fill_between(xs, lo, hi, alpha=0.2, label="IQR")
    ax.plot(xs, ys, marker="o", label="median Dice")
    ax.set_xlabel("training studies (vendor A phantoms)")
    ax.set_ylabel("Dice on vendor A test studies")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cross-vendor"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="processes writing phantoms")
    parser.add_argument("--epochs", type=int, help="training epochs (default 20)")
    parser.add_argument(
        "--curve-sizes", help="training-size curve sizes, comma-separated (default 6,18; 0 = none)"
    )
    parser.add_argument("--patience", type=int,
                        help="early stop after this many epochs without validation gain (default 6); "
                             "with 6 validation studies per scanner the validation Dice is noisy, so "
                             "a patience as long as --epochs trains to the end and keeps the best epoch")
    parser.add_argument("--arch", default="unet2d", help="architecture (strokeseg train --arch)")
    parser.add_argument("--width", type=int, help="first-level channels (strokeseg train --width)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    scale = QUICK if args.quick else Scale()
    if args.epochs:
        scale = replace(scale, epochs=args.epochs)
    if args.patience:
        scale = replace(scale, patience=args.patience)
    if args.curve_sizes:
        sizes = tuple(int(n) for n in args.curve_sizes.split(",") if int(n) > 0)
        scale = replace(scale, curve_sizes=sizes)
    arch_args = ("--arch", args.arch) + (("--width", str(args.width)) if args.width else ())
    run_experiment(args.out, scale, args.threads, args.workers, arch_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
