"""The post-processing sweep (models.experiments.component_rules): the rule it applies must be the
service's hysteresis plus a volume floor, and the leave-one-fold-out choice must never look at
the fold it reports."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation.metrics import case_metrics
from models.experiments.component_rules import (
    Rule,
    apply_rule,
    by_folder,
    choose,
    leave_one_fold_out,
    summarise,
)
from service.inference.session import lesion_mask


def _probability() -> np.ndarray:
    p = np.zeros((5, 20, 20), dtype=np.float32)
    p[1:4, 2:8, 2:8] = 0.6      # a confident core ...
    p[2, 4:6, 4:6] = 0.97       # ... that peaks high: a lesion
    p[1:3, 12:16, 12:16] = 0.7  # a doubtful component (peak 0.7)
    p[3, 18, 18] = 0.99         # a one-voxel speck, sure of itself
    p[1:4, 1, 2:8] = 0.35       # a rim the 0.5 threshold leaves out
    return p


def test_rule_matches_service_hysteresis() -> None:
    p = _probability()
    for threshold, peak in [(0.5, 0.0), (0.5, 0.8), (0.3, 0.9)]:
        np.testing.assert_array_equal(apply_rule(p, Rule(threshold, peak), 0.01), lesion_mask(p, threshold, peak))


def test_low_threshold_grows_the_outline_and_peak_drops_doubt() -> None:
    p = _probability()
    base = apply_rule(p, Rule(0.5), 0.01)
    grown = apply_rule(p, Rule(0.3, 0.9), 0.01)
    assert grown[1:4, 1, 2:8].all() and not base[1:4, 1, 2:8].any()  # the rim joins the lesion
    assert base[1:3, 12:16, 12:16].all() and not grown[1:3, 12:16, 12:16].any()  # doubt removed
    assert grown[3, 18, 18]  # the speck is sure of itself


def test_volume_floor_removes_specks_only() -> None:
    p = _probability()
    mask = apply_rule(p, Rule(0.5, 0.9, min_volume_ml=0.05), 0.01)
    assert not mask[3, 18, 18]
    assert mask[2, 4:6, 4:6].all()


def test_rule_key_round_trip() -> None:
    rule = Rule(0.35, 0.8, 0.05)
    assert Rule.from_key(rule.key) == rule


def _summary(dice_by_key: dict[str, float]) -> dict[str, dict[str, float]]:
    return {k: {"median_dice": d} for k, d in dice_by_key.items()}


def test_choose_prefers_the_mildest_of_equals() -> None:
    a, b = Rule(0.5).key, Rule(0.5, 0.9).key
    assert choose([_summary({a: 0.80, b: 0.80})], 0.5) == a
    assert choose([_summary({a: 0.80, b: 0.81})], 0.5) == b


def test_leave_one_fold_out_never_uses_the_reported_fold() -> None:
    a, b = Rule(0.5).key, Rule(0.4, 0.8).key
    folds = {
        "F1": _summary({a: 0.70, b: 0.99}),  # F1 alone would pick b ...
        "F2": _summary({a: 0.80, b: 0.70}),  # ... but F2 and F3 prefer a
        "F3": _summary({a: 0.80, b: 0.75}),
    }
    out = leave_one_fold_out(folds, 0.5)
    assert out["F1"]["rule"] == a and out["F1"]["result"]["median_dice"] == pytest.approx(0.70)
    # F2's choice comes from F1 + F3: a mean 0.75, b mean 0.87
    assert out["F2"]["rule"] == b


def test_fold_names_from_folder_or_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from models.experiments.component_rules import fold_name

    assert fold_name(tmp_path / "rules-F1" / "rules.json") == "rules-F1"
    assert fold_name(tmp_path / "rules-F2.json") == "rules-F2"


def test_each_test_folder_is_summarised_on_its_own_cases() -> None:
    """A sweep over a real subject and phantoms reports the subject without the phantoms."""
    truth = np.zeros((4, 10, 10), dtype=bool)
    truth[1:3, 2:6, 2:6] = True
    exact, half = truth.copy(), truth.copy()
    half[1] = False
    metrics = [
        case_metrics(mask, truth, 0.01, case=f"c{i}", vendor="")
        for i, mask in enumerate((exact, exact, half))
    ]
    for m, folder in zip(metrics, ("runs/real/S2", "runs/real/S2", "runs/ph/A-test"), strict=True):
        m.extra["folder"] = folder
    folders = by_folder(metrics)
    assert list(folders) == ["runs/real/S2", "runs/ph/A-test"]
    assert folders["runs/real/S2"]["median_dice"] == 1.0 and folders["runs/real/S2"]["cases"] == 2
    assert folders["runs/ph/A-test"]["median_dice"] < 1.0
    assert summarise(metrics)["cases"] == 3
