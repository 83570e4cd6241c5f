"""One backoff rule for everything strokeseg retries: delivery of results and Storage Commitment.

A shared leaf (like config and metrics): the job store, the commitment store and the
pipeline all schedule retries, and the rule that spaces them must be the same one, so
an operator who reads ``delivery.retry_*`` or ``delivery.commitment_followup_*`` in the
config knows what the service does.
"""

from __future__ import annotations


def backoff_delay_s(attempt: int, *, initial_s: float, max_interval_s: float) -> float:
    """Seconds to wait after attempt ``attempt`` (1-based) failed: ``initial_s``, doubling, capped.

    Attempt 1 waits ``initial_s``, attempt 2 twice that, and so on up to ``max_interval_s``;
    an attempt number below 1 counts as 1.
    """
    exponent = max(int(attempt) - 1, 0)
    if initial_s <= 0:
        return 0.0
    # 2**exponent grows without bound; stop doubling once past the cap.
    delay = float(initial_s)
    for _ in range(exponent):
        if delay >= max_interval_s:
            break
        delay *= 2.0
    return float(min(delay, max_interval_s))
