"""False-positive volume on real healthy scans: what a model reports where there is no stroke.

Every scan given is a real acquisition of a healthy volunteer, so every mL the
service reports is a false positive.  Each scan goes through the whole service
path (``service.pipeline.segment_files``: intake, preprocessing, ONNX Runtime,
the restricted-diffusion guard, the domain-of-validity checks, SEG + SR), once
as configured and once with the guard off, to show what the network itself
does and what the guard removes.

Usage::

    python -m models.experiments.real_healthy --model models/zoo/unet2d-realanat/0.6.1 \\
        ../shared/realdata/healthy/* --out runs/reports/healthy-0.6.1

Prints one line per scan and writes ``healthy.json`` and ``healthy.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from service.config import AssessSettings, RestrictionGuardSettings, load_settings
from service.inference import load_model
from service.pipeline import segment_files

log = logging.getLogger(__name__)


def scan_files(scan: Path) -> list[Path]:
    folder = scan / "dicom" if (scan / "dicom").is_dir() else scan
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def measure_scan(scan: Path, model_dir: Path, *, threads: int = 2) -> dict[str, Any]:
    """Lesion and ADC-core volume on one healthy scan, with and without the guard."""
    settings = load_settings()
    model = load_model(model_dir, intra_op_threads=threads)
    row: dict[str, Any] = {"scan": scan.name}
    for label, assess in (
        ("guarded", settings.assess),
        ("network", AssessSettings(restriction=RestrictionGuardSettings(enabled=False))),
    ):
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            result = segment_files(
                scan_files(scan), model, Path(out), settings.preprocess.profile_options(),
                settings.derive, assess_settings=assess,
            )
            seconds = time.perf_counter() - started
        assert result.findings is not None and result.validity is not None
        if label == "guarded":
            row.update(
                manufacturer=result.study.manufacturer,
                b_value=result.study.b_value,
                slices=result.study.dwi.shape[0],
                lesion_ml=round(result.segmentation.lesion_volume_ml, 3),
                adc_core_ml=round(result.findings.adc_core_volume_ml, 3),
                mimic_ml=round(sum(m.volume_ml for m in result.findings.mimics), 3),
                validity=result.validity.status,
                validity_reasons=list(result.validity.reasons),
                seconds=round(seconds, 2),
            )
        else:
            row["network_ml"] = round(result.segmentation.lesion_volume_ml, 3)
            row["network_core_ml"] = round(result.findings.adc_core_volume_ml, 3)
    return row


def markdown(rows: list[dict[str, Any]], model_dir: Path) -> str:
    lines = [
        f"# Real healthy scans: `{model_dir}`",
        "",
        "| scan | scanner | b | reported lesion (mL) | ADC core (mL) | set aside by the guard (mL) "
        "| network alone (mL) | validity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        validity = r["validity"] if not r["validity_reasons"] else "outside: " + "; ".join(r["validity_reasons"])
        lines.append(
            f"| {r['scan']} | {r['manufacturer']} | {r['b_value']:g} | {r['lesion_ml']:.2f} | "
            f"{r['adc_core_ml']:.2f} | {r['mimic_ml']:.2f} | {r['network_ml']:.2f} | {validity} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scans", nargs="+", type=Path, help="Scan folders (each with dicom/ or DICOM files).")
    parser.add_argument("--model", type=Path, required=True, help="Model bundle folder.")
    parser.add_argument("--out", type=Path, required=True, help="Report folder.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for scan in args.scans:
        row = measure_scan(scan, args.model, threads=args.threads)
        print(
            f"{row['scan']:<24} {row['manufacturer'][:10]:<10} b={row['b_value']:<6g} "
            f"lesion {row['lesion_ml']:7.2f} mL  core {row['adc_core_ml']:6.2f} mL  "
            f"network alone {row['network_ml']:7.2f} mL  {row['validity']}",
            flush=True,
        )
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "healthy.json").write_text(json.dumps({"model": str(args.model), "scans": rows}, indent=2))
    (args.out / "healthy.md").write_text(markdown(rows, args.model))
    worst = max(max(r["lesion_ml"], r["adc_core_ml"]) for r in rows)
    print(f"worst lesion or core volume: {worst:.2f} mL; report in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
