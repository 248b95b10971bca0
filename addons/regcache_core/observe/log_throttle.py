"""LogThrottle: at most one log line per key (a client address) per interval, so a client that
repeats a refused request cannot flood the log; the next line says how many were held back."""

from __future__ import annotations

import time

INTERVAL = 60.0  # seconds
MAX_KEYS = 10_000  # past this many, keys whose interval is over are forgotten


class LogThrottle:
    def __init__(self, interval: float = INTERVAL, clock=time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._keys: dict[str, tuple[float, int]] = {}  # key -> (time of its last line, lines held back since)

    def allow(self, key: str) -> int | None:
        """The number of lines held back since the last one for `key` when a line may be logged
        now; None when it may not."""
        now = self._clock()
        logged, held = self._keys.get(key, (float("-inf"), 0))
        if now - logged < self.interval:
            self._keys[key] = (logged, held + 1)
            return None
        if len(self._keys) >= MAX_KEYS:
            self._keys = {k: v for k, v in self._keys.items() if now - v[0] < self.interval}
        self._keys[key] = (now, 0)
        return held


def held_back(count: int) -> str:
    """The tail of a log line that follows held-back ones."""
    return f" ({count} more since the last such line)" if count else ""
