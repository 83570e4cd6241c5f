"""The evaluation toolkit against cases computed by hand.

Every expected number below is worked out in the comments next to it, so a
wrong convention (connectivity, ddof, boundary side, pooled vs per-case F1)
fails here rather than in a report that looks plausible.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from models.evaluation.metrics import (
    VOLUME_CLASSES,
    CaseMetrics,
    case_metrics,
    lesion_detection,
    volume_class,
)
from models.evaluation.report import summarise, write_report
from models.evaluation.stats import (
    bland_altman,
    bland_altman_plot,
    mann_whitney_u,
    wilcoxon_signed_rank,
)
from service.config import BUNDLED_MODEL_DIR

BUNDLE = BUNDLED_MODEL_DIR  # the model `strokeseg serve` uses by default
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mask(shape: tuple[int, int, int], *voxels: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for v in voxels:
        mask[v] = True
    return mask


# --- voxel-wise metrics ------------------------------------------------------------------


def test_case_metrics_by_hand() -> None:
    # truth: 4 voxels, an L in slice 0.  pred: 3 voxels, 2 of them on the truth.
    truth = _mask((2, 3, 3), (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0))
    pred = _mask((2, 3, 3), (0, 0, 0), (0, 0, 1), (1, 2, 2))
    m = case_metrics(pred, truth, 0.5, case="c1", vendor="GE")
    assert m.dice == pytest.approx(4 / 7)  # 2 * 2 / (3 + 4)
    assert m.sensitivity == pytest.approx(0.5)  # 2 of 4 truth voxels found
    assert m.precision == pytest.approx(2 / 3)  # 2 of 3 predicted voxels right
    assert m.truth_volume_ml == pytest.approx(2.0)  # 4 x 0.5 mL
    assert m.predicted_volume_ml == pytest.approx(1.5)  # 3 x 0.5 mL
    assert m.volume_difference_ml == pytest.approx(-0.5)  # pred - truth
    assert m.abs_volume_difference_ml == pytest.approx(0.5)
    assert m.volume_class == "medium"  # 2.0 mL is in [1.7, 14]
    # Lesions: truth is one component, hit; (1,2,2) is 2 rows away from any
    # other voxel, so it is a second predicted component, touching no truth: FP.
    # F1 = 2*1 / (2*1 + 1 + 0) = 2/3.
    assert (m.lesion_tp, m.lesion_fp, m.lesion_fn) == (1, 1, 0)
    assert m.lesion_f1 == pytest.approx(2 / 3)
    assert m.case == "c1" and m.vendor == "GE"
    assert json.loads(json.dumps(m.as_row()))["dice"] == pytest.approx(4 / 7)


def test_empty_mask_conventions() -> None:
    empty = np.zeros((2, 4, 4), dtype=bool)
    both_empty = case_metrics(empty, empty, 1.0, case="none", vendor="X")
    assert both_empty.dice == 1.0
    assert both_empty.sensitivity is None and both_empty.precision is None
    assert both_empty.volume_class == "none" and both_empty.lesion_free
    assert (both_empty.lesion_tp, both_empty.lesion_fp, both_empty.lesion_fn) == (0, 0, 0)
    assert both_empty.lesion_f1 == 1.0

    speck = _mask((2, 4, 4), (1, 1, 1))
    false_alarm = case_metrics(speck, empty, 0.25, case="fp", vendor="X")
    assert false_alarm.dice == 0.0
    assert false_alarm.sensitivity is None  # no truth voxel to find
    assert false_alarm.precision == 0.0  # 0 of 1 predicted voxel right
    assert false_alarm.predicted_volume_ml == pytest.approx(0.25)
    assert false_alarm.lesion_fp == 1 and false_alarm.lesion_f1 == 0.0  # 0 / (0 + 1 + 0)

    missed = case_metrics(empty, speck, 0.25, case="fn", vendor="X")
    assert missed.sensitivity == 0.0 and missed.precision is None
    assert missed.volume_class == "small"


def test_case_metrics_rejects_mismatched_grids() -> None:
    with pytest.raises(ValueError, match="shape"):
        case_metrics(
            np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool), 1.0, case="a", vendor="b"
        )
    with pytest.raises(ValueError, match="voxel volume"):
        case_metrics(
            np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2), bool), 0.0, case="a", vendor="b"
        )


# --- lesion-wise detection ---------------------------------------------------------------


def test_lesion_f1_one_hit_one_missed_one_false_positive() -> None:
    truth = np.zeros((5, 10, 10), dtype=bool)
    truth[0:2, 0:2, 0:2] = True  # lesion A
    truth[3:5, 7:9, 7:9] = True  # lesion B, far from A
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = True  # touches A -> A detected
    pred[4, 0, 9] = True  # touches nothing -> FP
    d = lesion_detection(pred, truth)
    # TP = 1 (A), FN = 1 (B), FP = 1; F1 = 2*1 / (2*1 + 1 + 1) = 0.5
    assert (d.tp, d.fp, d.fn) == (1, 1, 1)
    assert d.f1 == pytest.approx(0.5)
    assert d.precision == pytest.approx(0.5) and d.recall == pytest.approx(0.5)


def test_diagonal_voxels_are_one_lesion() -> None:
    # (0,0,0) and (1,1,1) share only a corner: one lesion with 26-connectivity
    # (two with 6-connectivity, which would make this FN = 1).
    truth = _mask((3, 3, 3), (0, 0, 0), (1, 1, 1))
    d = lesion_detection(_mask((3, 3, 3), (0, 0, 0)), truth)
    assert (d.tp, d.fp, d.fn) == (1, 0, 0) and d.f1 == 1.0
    # and as a prediction on an empty truth: one false positive, not two
    d = lesion_detection(truth, np.zeros_like(truth))
    assert (d.tp, d.fp, d.fn) == (0, 1, 0)
    assert d.precision == 0.0 and d.recall is None


def test_one_blob_over_two_lesions_detects_both() -> None:
    truth = _mask((1, 1, 5), (0, 0, 0), (0, 0, 4))  # two lesions, 3 voxels apart
    pred = np.ones((1, 1, 5), dtype=bool)  # one blob covering both
    d = lesion_detection(pred, truth)
    assert (d.tp, d.fp, d.fn) == (2, 0, 0)


def test_min_voxels_drops_specks() -> None:
    truth = np.zeros((4, 8, 8), dtype=bool)
    truth[0:2, 0:2, 0:2] = True  # an 8-voxel lesion
    truth[3, 7, 0] = True  # a 1-voxel truth speck, not predicted
    pred = truth.copy()
    pred[3, 7, 0] = False
    pred[3, 0, 7] = True  # a 1-voxel predicted speck, no truth there
    d = lesion_detection(pred, truth)
    assert (d.tp, d.fp, d.fn) == (1, 1, 1)  # 2*1 / (2 + 1 + 1) = 0.5
    assert d.f1 == pytest.approx(0.5)
    d = lesion_detection(pred, truth, min_voxels=2)
    assert (d.tp, d.fp, d.fn) == (1, 0, 0) and d.f1 == 1.0
    # a predicted speck on a truth speck detects nothing once both are dropped
    d = lesion_detection(_mask((1, 3, 3), (0, 0, 0)), _mask((1, 3, 3), (0, 0, 0)), min_voxels=2)
    assert (d.tp, d.fp, d.fn) == (0, 0, 0) and d.f1 == 1.0
    with pytest.raises(ValueError):
        lesion_detection(pred, truth, min_voxels=0)


# --- volume classes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("volume_ml", "expected"),
    [
        (0.0, "none"),
        (0.01, "small"),
        (1.69, "small"),
        (1.7, "medium"),
        (14.0, "medium"),
        (14.01, "large"),
        (300.0, "large"),
    ],
)
def test_volume_class_boundaries(volume_ml: float, expected: str) -> None:
    assert volume_class(volume_ml) == expected


def test_volume_class_table_and_invalid_volumes() -> None:
    assert [tuple(c) for c in VOLUME_CLASSES] == [
        ("small", 0.0, 1.7),
        ("medium", 1.7, 14.0),
        ("large", 14.0, math.inf),
    ]
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError):
            volume_class(bad)


# --- statistics --------------------------------------------------------------------------


def test_bland_altman_by_hand() -> None:
    # differences pred - truth: 2-1 = 1, 4-4 = 0, 6-8 = -2; bias = -1/3
    # deviations 4/3, 1/3, -5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9; / (n-1 = 2) = 7/3
    ba = bland_altman([2.0, 4.0, 6.0], [1.0, 4.0, 8.0])
    sd = math.sqrt(7 / 3)
    assert ba.n == 3
    assert ba.bias == pytest.approx(-1 / 3)
    assert ba.sd == pytest.approx(sd)
    assert ba.loa_low == pytest.approx(-1 / 3 - 1.96 * sd)
    assert ba.loa_high == pytest.approx(-1 / 3 + 1.96 * sd)
    assert ba.as_dict()["loa_high"] == pytest.approx(ba.loa_high)
    with pytest.raises(ValueError, match="at least 2"):
        bland_altman([1.0], [1.0])
    with pytest.raises(ValueError, match="paired"):
        bland_altman([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        bland_altman([1.0, math.nan], [1.0, 2.0])


def test_mann_whitney_u_by_hand() -> None:
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0, 8.0]
    r = mann_whitney_u(a, b)
    # no value of a beats any of b: U_a = 0; of the C(8,3) = 56 equally likely
    # rankings exactly one is this extreme per tail -> two-sided p = 2/56.
    assert r["statistic"] == 0.0
    assert r["p_value"] == pytest.approx(2 / 56)
    assert r["p_value"] == pytest.approx(sps.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    assert (r["n_a"], r["n_b"], r["median_a"], r["median_b"]) == (3, 5, 2.0, 6.0)
    # 3 vs 3: the smallest possible p is 2/C(6,3) = 0.1 > 0.05 -> refused
    with pytest.raises(ValueError, match="too small"):
        mann_whitney_u([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    with pytest.raises(ValueError, match="non-empty"):
        mann_whitney_u([], [1.0, 2.0])


def test_wilcoxon_signed_rank_by_hand() -> None:
    a = [11.0, 12.0, 13.0, 14.0, 15.0, 16.0]
    b = [10.0] * 6
    r = wilcoxon_signed_rank(a, b)
    # differences 1..6, all positive: W- = 0; 1 of 2**6 = 64 sign patterns per
    # tail is this extreme -> two-sided p = 2/64.
    assert r["statistic"] == 0.0
    assert r["p_value"] == pytest.approx(2 / 64)
    assert r["p_value"] == pytest.approx(sps.wilcoxon(a, b).pvalue)
    assert (r["n"], r["n_nonzero"], r["median_difference"]) == (6, 6, 3.5)
    # identical pairs: no crash, p = 1 and a note
    same = wilcoxon_signed_rank(a, a)
    assert same["p_value"] == 1.0 and "zero" in same["note"]
    # some zero differences are dropped and said so
    partly = wilcoxon_signed_rank([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [1.0, 2.0, 0, 0, 0, 0, 0])
    assert partly["n_nonzero"] == 5 and "2 zero differences" in partly["note"]
    # 5 pairs: smallest possible p is 2/32 = 0.0625 > 0.05 -> refused
    with pytest.raises(ValueError, match="too small"):
        wilcoxon_signed_rank(a[:5], b[:5])
    with pytest.raises(ValueError, match="paired"):
        wilcoxon_signed_rank(a, b[:5])


def test_bland_altman_plot_writes_png(tmp_path: Path) -> None:
    path = bland_altman_plot(
        [1.0, 2.5, 9.0],
        [1.2, 2.0, 10.0],
        tmp_path / "sub" / "ba.png",
        title="t",
        groups=["GE", "SIEMENS", "GE"],
    )
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert os.listdir(path.parent) == ["ba.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="groups"):
        bland_altman_plot([1.0], [1.0], tmp_path / "x.png", title="t", groups=["a", "b"])


# --- summaries and the report ------------------------------------------------------------


def _case(
    name: str,
    vendor: str,
    truth_ml: float,
    pred_ml: float,
    dice: float,
    tp: int = 0,
    fp: int = 0,
    fn: int = 0,
    lesion_f1: float = 1.0,
) -> CaseMetrics:
    return CaseMetrics(
        case=name,
        vendor=vendor,
        truth_volume_ml=truth_ml,
        predicted_volume_ml=pred_ml,
        volume_class=volume_class(truth_ml),
        dice=dice,
        sensitivity=dice if truth_ml else None,
        precision=dice if pred_ml else None,
        abs_volume_difference_ml=abs(pred_ml - truth_ml),
        volume_difference_ml=pred_ml - truth_ml,
        lesion_tp=tp,
        lesion_fp=fp,
        lesion_fn=fn,
        lesion_f1=lesion_f1,
    )


CASES = [
    _case("a", "SIEMENS", 0.0, 0.0, 1.0),  # lesion-free, clean
    _case("b", "GE", 0.0, 0.3, 0.0, fp=1, lesion_f1=0.0),  # lesion-free, 0.3 mL FP
    _case("c", "SIEMENS", 1.0, 0.8, 0.6, tp=1, lesion_f1=1.0),  # small
    _case("d", "GE", 1.5, 0.0, 0.0, fn=2, lesion_f1=0.0),  # small, both lesions missed
    _case("e", "SIEMENS", 10.0, 11.0, 0.8, tp=2, fp=1, lesion_f1=0.8),  # medium
    _case("f", "SIEMENS", 50.0, 46.0, 0.9, tp=1, lesion_f1=1.0),  # large
]


def test_summarise_stratifies() -> None:
    s = summarise(CASES)
    assert s["n_cases"] == 6
    assert {k: v["n"] for k, v in s["by_volume_class"].items()} == {
        "none": 2,
        "small": 2,
        "medium": 1,
        "large": 1,
    }
    assert {k: v["n"] for k, v in s["by_vendor"].items()} == {"GE": 2, "SIEMENS": 4}
    assert {
        v: {k: c["n"] for k, c in cells.items()} for v, cells in s["by_vendor_class"].items()
    } == {
        "GE": {"none": 1, "small": 1},
        "SIEMENS": {"none": 1, "small": 1, "medium": 1, "large": 1},
    }
    overall = s["overall"]
    # Dice over the 4 cases with a lesion: 0.6, 0.0, 0.8, 0.9 -> median 0.7, mean 0.575
    assert overall["dice_n"] == 4
    assert overall["dice_median"] == pytest.approx(0.7)
    assert overall["dice_mean"] == pytest.approx(0.575)
    # linear quartiles of sorted [0, 0.6, 0.8, 0.9]: q1 at index 0.75 -> 0.45; q3 at 2.25 -> 0.825
    assert overall["dice_q1"] == pytest.approx(0.45)
    assert overall["dice_q3"] == pytest.approx(0.825)
    # pooled lesion F1: TP 4, FP 2, FN 2 -> 8 / (8 + 2 + 2) = 2/3; per-case median of
    # [1, 0, 1, 0, 0.8, 1] = (0.8 + 1) / 2 = 0.9
    assert (overall["lesion_tp"], overall["lesion_fp"], overall["lesion_fn"]) == (4, 2, 2)
    assert overall["lesion_f1_pooled"] == pytest.approx(2 / 3)
    assert overall["lesion_f1_median"] == pytest.approx(0.9)
    # |dV| = 0, 0.3, 0.2, 1.5, 1, 4 -> sorted 0, 0.2, 0.3, 1, 1.5, 4: median 0.65, mean 7/6
    assert overall["abs_volume_difference_ml_median"] == pytest.approx(0.65)
    assert overall["abs_volume_difference_ml_mean"] == pytest.approx(7 / 6)
    assert overall["false_positive_ml_lesion_free_n"] == 2
    assert overall["false_positive_ml_lesion_free_with_any"] == 1
    assert overall["false_positive_ml_lesion_free_max"] == pytest.approx(0.3)
    # sensitivity skips the 2 lesion-free cases (None); precision skips the 2 empty predictions
    assert overall["sensitivity_n"] == 4 and overall["precision_n"] == 4
    assert overall["bland_altman"]["n"] == 6
    assert overall["bland_altman"]["bias"] == pytest.approx((0 + 0.3 - 0.2 - 1.5 + 1 - 4) / 6)
    # a class with one case has no Bland-Altman; lesion-free has no Dice
    assert s["by_volume_class"]["large"]["bland_altman"] is None
    assert s["by_volume_class"]["none"]["dice_median"] is None
    empty = summarise([])
    assert empty["overall"]["n"] == 0 and empty["overall"]["lesion_f1_pooled"] is None


def test_write_report(tmp_path: Path) -> None:
    lesion = [c for c in CASES if not c.lesion_free]
    siemens = [c.dice for c in CASES if c.vendor == "SIEMENS"]
    ge = [c.dice for c in CASES if c.vendor == "GE"]
    doc = write_report(
        CASES,
        tmp_path / "out",
        title="Phantom check",
        comparisons={
            "volume: predicted vs truth": (
                [0.8, 0.0, 11.0, 46.0, 3.0, 7.0],
                [1.0, 1.5, 10.0, 50.0, 2.0, 7.5],
                "wilcoxon",
            ),
            "Dice: SIEMENS vs GE": (siemens, ge, "mann-whitney"),  # 4 vs 2: refused
        },
        context={"model": "unet2d-phantom 0.1.0", "model_dir": BUNDLE, "n_lesion": len(lesion)},
    )
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["bland_altman.png", "report.json", "report.md"]
    assert (out / "bland_altman.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((out / "report.json").read_text()) == doc
    assert doc["title"] == "Phantom check" and len(doc["cases"]) == 6
    assert doc["context"]["model_dir"] == str(BUNDLE)
    assert doc["summary"]["by_volume_class"]["small"]["n"] == 2
    wilcoxon = doc["comparisons"]["volume: predicted vs truth"]
    assert wilcoxon["test"] == "wilcoxon-signed-rank" and 0 < wilcoxon["p_value"] <= 1
    refused = doc["comparisons"]["Dice: SIEMENS vs GE"]
    assert refused["test"] == "mann-whitney-u" and "too small" in refused["error"]
    md = (out / "report.md").read_text()
    for heading in (
        "# Phantom check",
        "## Overall",
        "## By volume class",
        "## By vendor",
        "## Bland-Altman",
        "## Comparison tests",
        "## Cases",
    ):
        assert heading in md
    assert "| volume class | n |" in md
    assert "| small | 2 | 2 |" in md and "| none | 2 | 0 |" in md
    assert "| SIEMENS | 4 |" in md and "| GE / small | 1 |" in md
    assert "| all | 6 |" in md  # Bland-Altman row of all cases
    assert "](bland_altman.png)" in md
    assert "| volume: predicted vs truth | wilcoxon-signed-rank | 6 pairs |" in md
    with pytest.raises(ValueError, match="unknown kind"):
        write_report(
            CASES, tmp_path / "bad", title="t", comparisons={"x": ([1.0], [2.0], "t-test")}
        )


# --- running the bundled model on case folders -------------------------------------------


def test_evaluate_case_dirs_on_phantoms_and_a_broken_case(tmp_path: Path) -> None:
    from models.evaluation.runner import CaseFailure, evaluate_case_dirs
    from models.synth import write_phantom_cases

    if not (BUNDLE / "model.onnx").is_file():
        pytest.fail(f"bundled model missing: {BUNDLE}")
    # seed 5, case 0: one medium lesion of ~8.5 mL on a 256 x 256 x 25 SIEMENS grid
    (phantom,) = write_phantom_cases(tmp_path / "cases", 1, seed=5)
    truth = json.loads((phantom / "truth" / "truth.json").read_text())
    assert truth["lesion_volume_ml"] >= 1.0

    broken = tmp_path / "cases" / "broken"  # intake finds no DICOM at all
    (broken / "dicom").mkdir(parents=True)
    (broken / "dicom" / "0001.dcm").write_text("this is not DICOM\n")
    (broken / "truth").mkdir()
    np.save(broken / "truth" / "mask.npy", np.zeros((2, 4, 4), dtype=bool))
    no_truth = tmp_path / "cases" / "no_truth"
    (no_truth / "dicom").mkdir(parents=True)

    failures: list[CaseFailure] = []
    lines = io.StringIO()
    results = evaluate_case_dirs(
        BUNDLE, [broken, phantom, no_truth], threads=2, failures=failures, stream=lines
    )
    assert [r.case for r in results] == ["case_0000"]
    (m,) = results
    assert m.vendor == "SIEMENS"  # no "domain" key: the manufacturer
    assert m.volume_class == volume_class(truth["lesion_volume_ml"]) == "medium"
    assert m.truth_volume_ml == pytest.approx(truth["lesion_volume_ml"], rel=1e-6)
    assert m.dice > 0.5, m
    assert m.lesion_tp >= 1
    assert m.extra["inference_s"] > 0
    assert [(f.case, f.stage) for f in failures] == [("broken", "intake"), ("no_truth", "truth")]
    assert "readable" in failures[0].reason
    printed = lines.getvalue().splitlines()
    assert len(printed) == 3
    assert printed[1].startswith("case_0000") and "SIEMENS" in printed[1] and "Dice" in printed[1]
    assert "FAILED (intake)" in printed[0]


@pytest.mark.parametrize(
    ("record", "vendor"),
    [
        ({"domain": "vendor_b", "manufacturer": "GE"}, "vendor_b"),
        ({"manufacturer": "Philips"}, "Philips"),
        ({"lesion_class": "none"}, "unknown"),
        (None, "unknown"),  # no truth.json at all
    ],
)
def test_vendor_of_a_case(tmp_path: Path, record: dict[str, str] | None, vendor: str) -> None:
    from models.evaluation.runner import _read_truth

    (tmp_path / "truth").mkdir()
    np.save(tmp_path / "truth" / "mask.npy", np.zeros((2, 3, 3), dtype=np.uint8))
    if record is not None:
        (tmp_path / "truth" / "truth.json").write_text(json.dumps(record))
    truth = _read_truth(tmp_path)
    assert truth.vendor == vendor
