"""When to renew, when to retry and when to ask the CA again: pure functions of time, no I/O.

Renew when one third of the lifetime remains (day 60 of 90, day 30 of 45) unless the
CA's ARI window says otherwise; after a failure back off 1 min, 10 min, 100 min,
then daily, with jitter, never earlier than the CA's Retry-After. The ARI window is
asked for again as the CA's Retry-After says, so a window the CA moves is followed.
"""

from __future__ import annotations

import random

BACKOFF = (60.0, 600.0, 6000.0, 86400.0)
JITTER = 0.1

# RFC 9773 4.3: ask again after the CA's Retry-After, treating values under a minute
# as a minute and over a day as a day; without one, every six hours.
ARI_DEFAULT = 6 * 3600.0
ARI_MIN = 60.0
ARI_MAX = 86400.0
ARI_AFTER_ERROR = 3600.0  # the CA did not answer: its window may still move, ask sooner


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


def follow_window(current: float, not_before: float, not_after: float,
                  ari_window: tuple[float, float] | None,
                  rng: random.Random | None = None) -> float:
    """The renewal time once the CA's window was asked for again: `current` while it
    lies inside the window (asking every few hours must not draw a new time each
    time), else a new time in it (renew_at). No window: `current` stays."""
    if ari_window is None:
        return current
    start, end = ari_window
    if start <= current <= end:
        return current
    return renew_at(not_before, not_after, ari_window, rng)


def ari_delay(retry_after: float | None) -> float:
    """Seconds until the CA's renewal information is asked for again."""
    if retry_after is None:
        return ARI_DEFAULT
    return min(max(retry_after, ARI_MIN), ARI_MAX)


def retry_delay(failures: int, retry_after: float | None = None,
                rng: random.Random | None = None) -> float:
    """Seconds to wait after the `failures`-th failure in a row (1-based)."""
    base = BACKOFF[min(max(failures, 1), len(BACKOFF)) - 1]
    jitter = 1.0 + JITTER * (2.0 * (rng or random).random() - 1.0)
    delay = base * jitter
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay
