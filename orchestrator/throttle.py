"""A token bucket shared by every transfer: the global ``--bwlimit``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """``take(n)`` blocks until ``n`` bytes fit under ``rate`` bytes/second.

    The burst is a quarter second of traffic, so short bursts pass and the
    long-run rate holds within a few percent."""

    def __init__(self, rate: float, *, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.burst = burst if burst is not None else max(self.rate / 4, 64 * 1024)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n  # may go negative: the debt is slept off below
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
