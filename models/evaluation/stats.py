"""Volume agreement and group comparisons: Bland-Altman, Mann-Whitney U, Wilcoxon.

These are the statistics the stroke-segmentation papers we compare against
report (Alis 2020, Noh 2023): Bland-Altman bias and 95 % limits of agreement
between predicted and reference lesion volume, the Mann-Whitney U test for two
independent groups (e.g. Dice on one vendor vs another) and the Wilcoxon
signed-rank test for paired measurements (e.g. predicted vs truth volume of
the same cases).  All tests are two-sided.

The tests refuse (``ValueError``) samples so small that *no* outcome could
reach ``alpha`` (0.05 by default): scipy would still return a p-value, but a
"not significant" that could never have been anything else is garbage
dressed as a result.  The smallest exact two-sided p-value is
``2 / C(n_a + n_b, n_a)`` for Mann-Whitney U and ``2 / 2**n`` for Wilcoxon, so
Mann-Whitney needs e.g. 3 vs 5 or 4 vs 4 values and Wilcoxon at least 6 pairs.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

logger = logging.getLogger(__name__)

#: 95 % limits of agreement: bias +- 1.96 SD of the differences (Bland & Altman 1986).
LOA_Z = 1.96
DEFAULT_ALPHA = 0.05


def _finite_vector(values: Sequence[float] | npt.ArrayLike, what: str) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return array


def _paired(
    a: Sequence[float] | npt.ArrayLike, b: Sequence[float] | npt.ArrayLike, what: tuple[str, str]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    x, y = _finite_vector(a, what[0]), _finite_vector(b, what[1])
    if x.shape != y.shape:
        raise ValueError(f"{what[0]} ({x.size}) and {what[1]} ({y.size}) must be paired")
    return x, y


@dataclass(frozen=True, slots=True)
class BlandAltman:
    """Bias and 95 % limits of agreement of predicted vs reference volume (mL).

    ``bias`` is mean(predicted - truth): positive means the model
    over-segments on average.  ``sd`` is the sample SD (ddof=1) of the
    differences, and the limits are ``bias +- 1.96 sd``.
    """

    n: int
    bias: float
    sd: float
    loa_low: float
    loa_high: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def bland_altman(
    predicted_ml: Sequence[float] | npt.ArrayLike, truth_ml: Sequence[float] | npt.ArrayLike
) -> BlandAltman:
    """Bland-Altman statistics of paired volumes; needs at least 2 pairs (for the SD)."""
    pred, truth = _paired(predicted_ml, truth_ml, ("predicted_ml", "truth_ml"))
    if pred.size < 2:
        raise ValueError(f"Bland-Altman needs at least 2 paired volumes, got {pred.size}")
    diff = pred - truth
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1))
    return BlandAltman(
        n=int(diff.size), bias=bias, sd=sd, loa_low=bias - LOA_Z * sd, loa_high=bias + LOA_Z * sd
    )


def bland_altman_plot(
    predicted_ml: Sequence[float] | npt.ArrayLike,
    truth_ml: Sequence[float] | npt.ArrayLike,
    path: Path,
    *,
    title: str,
    groups: Sequence[str] | None = None,
    dpi: int = 120,
) -> Path:
    """Write a Bland-Altman plot (PNG) of predicted vs truth volume to ``path``; returns it.

    x is the mean of the two volumes, y their difference (predicted - truth);
    the bias and both limits of agreement are drawn and labelled with their
    values.  ``groups`` (e.g. the vendor of each case) colours the points.
    With fewer than 2 cases only the points are drawn.

    Uses matplotlib's object API on an Agg canvas, not ``pyplot``: no global
    backend switch, no figure registry, safe in a worker thread or a server
    without a display.  The file is written atomically (tmp + rename).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pred, truth = _paired(predicted_ml, truth_ml, ("predicted_ml", "truth_ml"))
    if groups is not None and len(groups) != pred.size:
        raise ValueError(f"groups has {len(groups)} labels for {pred.size} cases")
    mean = (pred + truth) / 2.0
    diff = pred - truth

    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if groups is None:
        ax.scatter(mean, diff, s=22, alpha=0.8, color="tab:blue")
    else:
        labels = list(groups)
        for name in sorted(set(labels)):
            chosen = np.array([g == name for g in labels])
            ax.scatter(
                mean[chosen], diff[chosen], s=22, alpha=0.8, label=f"{name} (n={chosen.sum()})"
            )
    ax.axhline(0.0, color="0.8", linewidth=0.8)
    if pred.size >= 2:
        ba = bland_altman(pred, truth)
        for value, label, style in (
            (ba.bias, f"bias {ba.bias:+.2f} mL", "-"),
            (ba.loa_high, f"bias + 1.96 SD: {ba.loa_high:+.2f} mL", "--"),
            (ba.loa_low, f"bias - 1.96 SD: {ba.loa_low:+.2f} mL", "--"),
        ):
            ax.axhline(value, color="tab:red", linestyle=style, linewidth=1.0)
            ax.annotate(
                label,
                xy=(1.0, value),
                xycoords=("axes fraction", "data"),
                xytext=(-4, 3),
                textcoords="offset points",
                ha="right",
                va="bottom",
                fontsize="small",
                color="tab:red",
            )
        # Room above and below the limits so their labels never sit on a point.
        low = min(float(diff.min()), ba.loa_low)
        high = max(float(diff.max()), ba.loa_high)
        pad = 0.12 * (high - low) if high > low else 1.0
        ax.set_ylim(low - pad, high + pad)
    elif pred.size == 0:
        ax.text(0.5, 0.5, "no cases", transform=ax.transAxes, ha="center", va="center")
    if groups is not None and pred.size:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    ax.set_xlabel("mean of predicted and truth lesion volume (mL)")
    ax.set_ylabel("predicted - truth lesion volume (mL)")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=10)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote Bland-Altman plot of %d cases to %s", pred.size, path)
    return path


def _check_alpha_reachable(smallest_p: float, alpha: float, what: str) -> None:
    if smallest_p > alpha:
        raise ValueError(
            f"{what} too small: the smallest possible two-sided p-value is {smallest_p:.3g} "
            f"> alpha {alpha:g}, so the test could never find a difference"
        )


def mann_whitney_u(
    a: Sequence[float] | npt.ArrayLike,
    b: Sequence[float] | npt.ArrayLike,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> dict[str, Any]:
    """Two-sided Mann-Whitney U test of two independent samples (scipy's ``mannwhitneyu``).

    ``statistic`` is scipy's U of ``a``.  Refuses (``ValueError``) samples
    whose sizes cannot reach ``alpha``; see the module docstring.
    """
    x, y = _finite_vector(a, "sample a"), _finite_vector(b, "sample b")
    if x.size == 0 or y.size == 0:
        raise ValueError(f"Mann-Whitney U needs two non-empty samples, got {x.size} and {y.size}")
    _check_alpha_reachable(
        2.0 / math.comb(x.size + y.size, x.size),
        alpha,
        f"samples of {x.size} and {y.size} values",
    )
    result = sps.mannwhitneyu(x, y, alternative="two-sided")
    return {
        "test": "mann-whitney-u",
        "alternative": "two-sided",
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "n_a": int(x.size),
        "n_b": int(y.size),
        "median_a": float(np.median(x)),
        "median_b": float(np.median(y)),
    }


def wilcoxon_signed_rank(
    a: Sequence[float] | npt.ArrayLike,
    b: Sequence[float] | npt.ArrayLike,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of paired samples ``a`` and ``b``.

    Zero differences are dropped (scipy's default ``zero_method="wilcox"``);
    ``n_nonzero`` says how many pairs were left.  When *every* difference is
    zero the samples agree exactly: ``p_value`` is 1.0 with a ``note``, rather
    than scipy's warning and 0/0.  Refuses (``ValueError``) fewer pairs than
    can reach ``alpha`` (6 at 0.05); see the module docstring.  That check
    counts all pairs: a zero difference is data (exact agreement, e.g. two
    lesion-free cases at 0 mL), not a missing sample.
    """
    x, y = _paired(a, b, ("sample a", "sample b"))
    _check_alpha_reachable(2.0 / 2.0**x.size, alpha, f"{x.size} pairs")
    diff = x - y
    n_nonzero = int(np.count_nonzero(diff))
    out: dict[str, Any] = {
        "test": "wilcoxon-signed-rank",
        "alternative": "two-sided",
        "n": int(x.size),
        "n_nonzero": n_nonzero,
        "median_a": float(np.median(x)),
        "median_b": float(np.median(y)),
        "median_difference": float(np.median(diff)),
    }
    if n_nonzero == 0:
        out.update(statistic=0.0, p_value=1.0, note="all paired differences are zero")
        return out
    result = sps.wilcoxon(x, y, alternative="two-sided")
    out.update(statistic=float(result.statistic), p_value=float(result.pvalue))
    if n_nonzero < x.size:
        out["note"] = f"{x.size - n_nonzero} zero differences dropped"
    return out
