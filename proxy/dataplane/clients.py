"""Per-client limits of one worker: connections open per client address, and a
request rate per client address and app (token bucket).

Owns only counters, keyed by the peer address as the listener saw it; the listener
asks `admit` / `release` per connection and the exchange asks `allow_request` per
request when a rate is configured. Nothing here does I/O. Memory stays bounded by
what is in use: a count is dropped at zero, and buckets that have filled up again are
swept out as the table grows.
"""

from __future__ import annotations

import time


class Clients:
    __slots__ = ("_buckets", "_connections", "_sweep_at")

    def __init__(self) -> None:
        self._connections: dict[str, int] = {}
        # (client, app) -> [tokens, when they were counted]
        self._buckets: dict[tuple[str, str], list[float]] = {}
        self._sweep_at = 1024

    def admit(self, client: str, limit: int) -> bool:
        """Count a new connection from `client`; False (not counted) past `limit`."""
        n = self._connections.get(client, 0)
        if n >= limit:
            return False
        self._connections[client] = n + 1
        return True

    def release(self, client: str) -> None:
        """A connection `admit` counted has closed."""
        n = self._connections.get(client, 0) - 1
        if n > 0:
            self._connections[client] = n
        else:
            self._connections.pop(client, None)

    def connections(self, client: str) -> int:
        return self._connections.get(client, 0)

    def allow_request(self, client: str, app: str, rate: float, burst: int) -> bool:
        """Take a token from the (client, app) bucket: `burst` tokens, refilled at
        `rate` per second. False when it is empty."""
        now = time.monotonic()
        key = (client, app)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now, rate, burst)
            bucket = self._buckets[key] = [float(burst), now]
        tokens = min(float(burst), bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _sweep(self, now: float, rate: float, burst: int) -> None:
        """Forget the buckets that are full again (they would start over the same)."""
        self._buckets = {key: b for key, b in self._buckets.items()
                         if b[0] + (now - b[1]) * rate < burst}
        self._sweep_at = max(1024, 2 * len(self._buckets))
