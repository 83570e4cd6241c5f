"""The inference stage's own rules, on arrays (the network itself is tested in test_training)."""

from __future__ import annotations

import numpy as np
import pytest

from service.inference.card import ModelCard
from service.inference.session import lesion_mask


def _probability() -> np.ndarray:
    """Two components above 0.5: one the network is sure of (peak 0.97), one it is not (0.7)."""
    p = np.zeros((4, 16, 16), dtype=np.float32)
    p[1:3, 2:6, 2:6] = 0.6
    p[2, 3, 3] = 0.97
    p[1:3, 10:13, 10:13] = 0.55
    p[1, 11, 11] = 0.7
    p[0, 0, 15] = 0.45  # below the threshold: never lesion
    return p


def test_without_a_minimum_peak_every_component_above_the_threshold_counts() -> None:
    p = _probability()
    np.testing.assert_array_equal(lesion_mask(p, 0.5), p >= 0.5)
    np.testing.assert_array_equal(lesion_mask(p, 0.5, 0.0), p >= 0.5)


def test_a_component_counts_only_if_its_peak_reaches_the_minimum() -> None:
    p = _probability()
    mask = lesion_mask(p, 0.5, 0.8)
    assert mask[1:3, 2:6, 2:6].all()  # the sure component keeps its whole outline, rim included
    assert not mask[:, 9:, 9:].any()  # the unsure one is dropped whole
    assert int(mask.sum()) == 2 * 4 * 4
    assert not lesion_mask(p, 0.5, 0.99).any()
    assert not lesion_mask(np.zeros((2, 4, 4)), 0.5, 0.8).any()


def test_components_touching_only_at_a_corner_are_one_lesion() -> None:
    """26-connectivity, as the lesion counts of the SR and the evaluation use."""
    p = np.zeros((3, 5, 5), dtype=np.float32)
    p[0, 0, 0] = 0.9
    p[1, 1, 1] = 0.6
    assert lesion_mask(p, 0.5, 0.8)[1, 1, 1]


def test_the_card_bounds_the_minimum_peak() -> None:
    base = {"name": "m", "version": "1"}
    assert ModelCard(**base).min_component_peak_probability == 0.0
    assert ModelCard(**base, min_component_peak_probability=0.8).min_component_peak_probability == 0.8
    with pytest.raises(ValueError):
        ModelCard(**base, min_component_peak_probability=1.0)
