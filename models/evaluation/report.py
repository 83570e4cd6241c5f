"""Evaluation report: stratified summaries, JSON + markdown + Bland-Altman plot.

A report answers "how good is this model, on which lesions, on which
scanners": every summary is given overall, by truth volume class
(none/small/medium/large, see :func:`models.evaluation.metrics.volume_class`),
by vendor and by vendor x class, because an overall median hides exactly the
strata (small lesions, one vendor's b-value convention) where a model fails.

Summary conventions:

* **Dice** is summarised over cases *with* a truth lesion.  On a lesion-free
  case Dice is 1 (nothing predicted) or 0 (any false-positive voxel), and a
  handful of such cases would swamp the distribution; those cases are
  summarised by their false-positive volume instead.
* Sensitivity and precision medians skip cases where they are undefined
  (``None``: empty truth, empty prediction).
* **Lesion-wise F1** is given two ways: *pooled* (2 TP / (2 TP + FP + FN) over
  the summed counts, which weights cases by their number of lesions) and the
  *median of per-case F1* (which weights every patient equally).
* IQR quartiles use numpy's default (linear) percentile interpolation.
* Bland-Altman statistics are given for groups of at least 2 cases.

:func:`write_report` writes ``bland_altman.png``, ``report.md`` and, last,
``report.json``, each atomically (tmp + ``os.replace``): a report.json that
exists belongs to a complete report.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation.metrics import LESION_FREE, VOLUME_CLASS_NAMES, CaseMetrics
from models.evaluation.stats import (
    bland_altman,
    bland_altman_plot,
    mann_whitney_u,
    wilcoxon_signed_rank,
)

logger = logging.getLogger(__name__)

REPORT_FORMAT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
BLAND_ALTMAN_PNG = "bland_altman.png"

#: Comparison kinds accepted by :func:`write_report`: (the test's name in the report, the test).
COMPARISON_TESTS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "mann-whitney": ("mann-whitney-u", mann_whitney_u),
    "wilcoxon": ("wilcoxon-signed-rank", wilcoxon_signed_rank),
}


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _group_summary(cases: Sequence[CaseMetrics]) -> dict[str, Any]:
    """The summary of one stratum; every statistic is ``None`` when it has no data."""
    with_lesion = [c for c in cases if not c.lesion_free]
    lesion_free = [c for c in cases if c.lesion_free]
    dice = [c.dice for c in with_lesion]
    sensitivity = [c.sensitivity for c in cases if c.sensitivity is not None]
    precision = [c.precision for c in cases if c.precision is not None]
    tp = sum(c.lesion_tp for c in cases)
    fp = sum(c.lesion_fp for c in cases)
    fn = sum(c.lesion_fn for c in cases)
    abs_diff = [c.abs_volume_difference_ml for c in cases]
    fp_ml = [c.predicted_volume_ml for c in lesion_free]
    q1, q3 = (float(q) for q in np.percentile(dice, [25, 75])) if dice else (None, None)
    if not cases:
        pooled_f1: float | None = None
    else:
        pooled_f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 1.0
    return {
        "n": len(cases),
        "n_with_lesion": len(with_lesion),
        "n_lesion_free": len(lesion_free),
        "truth_volume_ml_median": _median([c.truth_volume_ml for c in cases]),
        "dice_n": len(dice),
        "dice_median": _median(dice),
        "dice_mean": _mean(dice),
        "dice_q1": q1,
        "dice_q3": q3,
        "sensitivity_n": len(sensitivity),
        "sensitivity_median": _median(sensitivity),
        "precision_n": len(precision),
        "precision_median": _median(precision),
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "lesion_f1_pooled": pooled_f1,
        "lesion_f1_median": _median([c.lesion_f1 for c in cases]),
        "abs_volume_difference_ml_median": _median(abs_diff),
        "abs_volume_difference_ml_mean": _mean(abs_diff),
        "false_positive_ml_lesion_free_n": len(fp_ml),
        "false_positive_ml_lesion_free_with_any": sum(1 for v in fp_ml if v > 0),
        "false_positive_ml_lesion_free_mean": _mean(fp_ml),
        "false_positive_ml_lesion_free_max": max(fp_ml) if fp_ml else None,
        "bland_altman": (
            bland_altman(
                [c.predicted_volume_ml for c in cases], [c.truth_volume_ml for c in cases]
            ).as_dict()
            if len(cases) >= 2
            else None
        ),
    }


def summarise(cases: Sequence[CaseMetrics]) -> dict[str, Any]:
    """Summaries overall, by volume class, by vendor and by vendor x volume class.

    ``by_volume_class`` always lists all four classes (``n`` = 0 for an empty
    one, so a missing stratum is visible); ``by_vendor`` lists the vendors
    seen, sorted; ``by_vendor_class[vendor][class]`` lists only non-empty cells.
    """
    vendors = sorted({c.vendor for c in cases})
    return {
        "n_cases": len(cases),
        "overall": _group_summary(cases),
        "by_volume_class": {
            name: _group_summary([c for c in cases if c.volume_class == name])
            for name in VOLUME_CLASS_NAMES
        },
        "by_vendor": {
            vendor: _group_summary([c for c in cases if c.vendor == vendor]) for vendor in vendors
        },
        "by_vendor_class": {
            vendor: {
                name: _group_summary(cell)
                for name in VOLUME_CLASS_NAMES
                if (cell := [c for c in cases if c.vendor == vendor and c.volume_class == name])
            }
            for vendor in vendors
        },
    }


def run_comparisons(
    comparisons: Mapping[str, tuple[Sequence[float], Sequence[float], str]],
) -> dict[str, dict[str, Any]]:
    """Run each ``label: (a, b, kind)`` test; a refused test is recorded with its ``error``.

    An unknown ``kind`` is a caller bug and raises ``ValueError`` before any
    test runs; a sample too small for its test is a property of the data and
    ends up in the report instead of aborting it.
    """
    for label, (_, _, kind) in comparisons.items():
        if kind not in COMPARISON_TESTS:
            raise ValueError(
                f"comparison {label!r}: unknown kind {kind!r} (use {', '.join(COMPARISON_TESTS)})"
            )
    results: dict[str, dict[str, Any]] = {}
    for label, (a, b, kind) in comparisons.items():
        name, test = COMPARISON_TESTS[kind]
        try:
            results[label] = {"kind": kind, **test(a, b)}
        except ValueError as exc:
            logger.warning("comparison %r not run: %s", label, exc)
            results[label] = {"kind": kind, "test": name, "error": str(exc)}
    return results


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars, paths and non-finite floats made JSON-safe (NaN -> None)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _dice_cell(s: Mapping[str, Any]) -> str:
    if s["dice_median"] is None:
        return "-"
    return f"{s['dice_median']:.3f} [{s['dice_q1']:.3f}-{s['dice_q3']:.3f}]"


def _false_positive_cell(s: Mapping[str, Any]) -> str:
    if not s["false_positive_ml_lesion_free_n"]:
        return "-"
    return (
        f"{s['false_positive_ml_lesion_free_with_any']}/{s['false_positive_ml_lesion_free_n']}, "
        f"max {s['false_positive_ml_lesion_free_max']:.2f}"
    )


_SUMMARY_HEADER = (
    "n",
    "with lesion",
    "Dice median [IQR]",
    "Dice mean",
    "sensitivity median",
    "precision median",
    "lesion F1 pooled",
    "lesion F1 median",
    "lesion TP/FP/FN",
    "abs vol diff median (mL)",
    "abs vol diff mean (mL)",
    "lesion-free with FP, max FP (mL)",
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _summary_table(first: str, groups: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    rows = [
        [
            name,
            str(s["n"]),
            str(s["n_with_lesion"]),
            _dice_cell(s),
            _fmt(s["dice_mean"]),
            _fmt(s["sensitivity_median"]),
            _fmt(s["precision_median"]),
            _fmt(s["lesion_f1_pooled"]),
            _fmt(s["lesion_f1_median"]),
            f"{s['lesion_tp']}/{s['lesion_fp']}/{s['lesion_fn']}",
            _fmt(s["abs_volume_difference_ml_median"], 2),
            _fmt(s["abs_volume_difference_ml_mean"], 2),
            _false_positive_cell(s),
        ]
        for name, s in groups
    ]
    return _table((first, *_SUMMARY_HEADER), rows)


def _markdown(document: Mapping[str, Any]) -> str:
    summary = document["summary"]
    lines = [f"# {document['title']}", "", f"Generated {document['generated_at']}."]
    if document["context"]:
        lines.append("")
        lines += [f"- **{key}**: `{value}`" for key, value in document["context"].items()]
    lines += [
        "",
        "Dice is summarised over cases with a truth lesion; lesion-free cases are counted by "
        "false-positive volume.  Volume classes (truth): small < 1.7 mL <= medium <= 14 mL < "
        "large.  Lesion F1 pooled = 2TP / (2TP + FP + FN) over summed counts.",
        "",
        "## Overall",
        "",
        *_summary_table("group", [("all", summary["overall"])]),
        "",
        "## By volume class",
        "",
        *_summary_table("volume class", list(summary["by_volume_class"].items())),
        "",
        "## By vendor",
        "",
        *_summary_table("vendor", list(summary["by_vendor"].items())),
        "",
        "## By vendor and volume class",
        "",
        *_summary_table(
            "vendor / class",
            [
                (f"{vendor} / {name}", s)
                for vendor, cells in summary["by_vendor_class"].items()
                for name, s in cells.items()
            ],
        ),
        "",
        "## Bland-Altman (predicted - truth volume, mL)",
        "",
    ]
    ba_groups = [("all", summary["overall"])]
    ba_groups += [(f"class {k}", v) for k, v in summary["by_volume_class"].items()]
    ba_groups += [(f"vendor {k}", v) for k, v in summary["by_vendor"].items()]
    ba_rows = [
        [
            name,
            str(ba["n"]),
            f"{ba['bias']:+.3f}",
            f"{ba['sd']:.3f}",
            f"{ba['loa_low']:+.3f}",
            f"{ba['loa_high']:+.3f}",
        ]
        for name, s in ba_groups
        if (ba := s["bland_altman"]) is not None
    ]
    lines += _table(("group", "n", "bias", "SD", "LoA low", "LoA high"), ba_rows)
    lines += ["", f"![Bland-Altman plot]({document['files']['bland_altman_png']})", ""]
    lines += ["## Comparison tests (two-sided)", ""]
    if document["comparisons"]:
        comparison_rows = []
        for label, r in document["comparisons"].items():
            if "error" in r:
                comparison_rows.append([label, r["test"], "-", "-", "-", "-", r["error"]])
                continue
            n = f"{r['n_a']} vs {r['n_b']}" if "n_a" in r else f"{r['n']} pairs"
            comparison_rows.append(
                [
                    label,
                    r["test"],
                    n,
                    _fmt(r["statistic"]),
                    f"{r['p_value']:.4g}",
                    f"{r['median_a']:.3f} vs {r['median_b']:.3f}",
                    r.get("note", ""),
                ]
            )
        lines += _table(
            ("comparison", "test", "n", "statistic", "p", "medians (a vs b)", "note"),
            comparison_rows,
        )
    else:
        lines.append("No comparisons requested.")
    lines += ["", "## Cases", ""]
    lines += _table(
        (
            "case",
            "vendor",
            "class",
            "truth mL",
            "pred mL",
            "Dice",
            "sensitivity",
            "precision",
            "lesion TP/FP/FN",
            "lesion F1",
        ),
        [
            [
                row["case"],
                row["vendor"],
                row["volume_class"],
                f"{row['truth_volume_ml']:.2f}",
                f"{row['predicted_volume_ml']:.2f}",
                _fmt(row["dice"]),
                _fmt(row["sensitivity"]),
                _fmt(row["precision"]),
                f"{row['lesion_tp']}/{row['lesion_fp']}/{row['lesion_fn']}",
                _fmt(row["lesion_f1"]),
            ]
            for row in document["cases"]
        ],
    )
    return "\n".join(lines) + "\n"


def write_report(
    cases: Sequence[CaseMetrics],
    out_dir: Path,
    *,
    title: str,
    comparisons: Mapping[str, tuple[Sequence[float], Sequence[float], str]] | None = None,
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``bland_altman.png`` into ``out_dir``.

    ``comparisons`` maps a label to ``(a, b, kind)`` with ``kind``
    ``"mann-whitney"`` (independent samples) or ``"wilcoxon"`` (paired); a
    test refused for a too-small sample is recorded with its ``error``.
    ``context`` (model name and version, the command line, data set ...) is
    stored as given; values that are not JSON types are stored as ``str``.
    Returns the JSON document exactly as written to ``report.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tested = run_comparisons(comparisons or {})
    document: dict[str, Any] = _jsonable(
        {
            "format_version": REPORT_FORMAT_VERSION,
            "title": title,
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "context": dict(context or {}),
            "files": {
                "json": REPORT_JSON,
                "markdown": REPORT_MARKDOWN,
                "bland_altman_png": BLAND_ALTMAN_PNG,
            },
            "summary": summarise(cases),
            "comparisons": tested,
            "cases": [c.as_row() for c in cases],
        }
    )
    bland_altman_plot(
        [c.predicted_volume_ml for c in cases],
        [c.truth_volume_ml for c in cases],
        out_dir / BLAND_ALTMAN_PNG,
        title=f"{title}: lesion volume agreement (n={len(cases)})",
        groups=[c.vendor for c in cases],
    )
    _write_text_atomically(out_dir / REPORT_MARKDOWN, _markdown(document))
    _write_text_atomically(
        out_dir / REPORT_JSON, json.dumps(document, indent=2, allow_nan=False) + "\n"
    )
    n_free = sum(1 for c in cases if c.volume_class == LESION_FREE)
    logger.info(
        "wrote evaluation report of %d cases (%d lesion-free) to %s", len(cases), n_free, out_dir
    )
    return document
