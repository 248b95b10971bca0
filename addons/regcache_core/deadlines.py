"""Keys that each hold until a deadline, for blobs handed out by URL (mitm/budget.py, and
cluster/reads.py's registrations of them): a 307 of a warm blob sets one, so setting it must
cost O(1) on the proxy's request path, however many blobs are held.

The callers set each deadline as now plus one fixed length, so the deadlines are in the order
they were set: a key set again moves to the end, and the expired ones are at the front, each
dropped once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator


class Deadlines:
    """Keys, each with the monotonic time it holds until (at least as late as those set before)."""

    def __init__(self) -> None:
        self._until: OrderedDict[Hashable, float] = OrderedDict()

    def set(self, key: Hashable, until: float) -> None:
        self._until[key] = until
        self._until.move_to_end(key)

    def until(self, key: Hashable) -> float:
        """When `key` stops holding (0.0 for a key not held)."""
        return self._until.get(key, 0.0)

    def drop_expired(self, now: float) -> None:
        while self._until and next(iter(self._until.values())) <= now:
            self._until.popitem(last=False)

    def clear(self) -> None:
        self._until.clear()

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._until)
