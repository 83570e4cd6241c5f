"""The one backoff rule that spaces delivery retries and Storage Commitment follow-ups."""

from __future__ import annotations

import pytest

from service.backoff import backoff_delay_s


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 30.0), (1, 30.0), (2, 60.0), (3, 120.0), (4, 240.0), (5, 300.0), (60, 300.0), (10**6, 300.0)],
)
def test_doubles_from_the_initial_wait_up_to_the_cap(attempt: int, expected: float) -> None:
    assert backoff_delay_s(attempt, initial_s=30.0, max_interval_s=300.0) == expected


def test_no_initial_wait_means_no_wait() -> None:
    assert backoff_delay_s(7, initial_s=0.0, max_interval_s=300.0) == 0.0


def test_delivery_and_commitment_use_the_same_rule() -> None:
    """Neither stage keeps a formula of its own (the issue: it was written twice)."""
    import inspect

    import service.db.commitment as commitment
    import service.pipeline as pipeline

    for module in (commitment, pipeline):
        source = inspect.getsource(module)
        assert "backoff_delay_s(" in source
        assert "2 **" not in source
