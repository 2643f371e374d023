"""When to renew and when to retry: pure functions of time, no I/O.

Renew when one third of the lifetime remains (day 60 of 90, day 30 of 45) unless the
CA's ARI window says otherwise; after a failure back off 1 min, 10 min, 100 min,
then daily, with jitter, never earlier than the CA's Retry-After.
"""

from __future__ import annotations

import random

BACKOFF = (60.0, 600.0, 6000.0, 86400.0)
JITTER = 0.1


def renew_at(not_before: float, not_after: float,
             ari_window: tuple[float, float] | None = None,
             rng: random.Random | None = None) -> float:
    """The time to start renewing a certificate valid from not_before to not_after."""
    if ari_window is not None:
        start, end = ari_window
        if end > start:
            # RFC 9773: pick a uniformly random time inside the suggested window.
            return start + (rng or random).random() * (end - start)
        return start
    return not_after - (not_after - not_before) / 3.0


def retry_delay(failures: int, retry_after: float | None = None,
                rng: random.Random | None = None) -> float:
    """Seconds to wait after the `failures`-th failure in a row (1-based)."""
    base = BACKOFF[min(max(failures, 1), len(BACKOFF)) - 1]
    jitter = 1.0 + JITTER * (2.0 * (rng or random).random() - 1.0)
    delay = base * jitter
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay
