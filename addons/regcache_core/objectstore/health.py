"""Whether the object store can be reached, as the proxy sees it.

It goes down when a call gets no answer it can serve with (StoreUnreachable: no connection, the
deadline passed, a 5xx). While it is down nobody waits for it: warm pulls of the caches on it
get 503 UNAVAILABLE at once (containerd then falls back to its next host), and one background
probe asks again every RETRY_EVERY seconds; its first answer brings the store back
(reachability.py). One WARNING line each way, never one per request; /ready's body and
`regcache_object_store_up` show it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ..observe import warn
from ..reachability import Reachability
from ..upstream.state import RETRY_EVERY

logger = logging.getLogger(__name__)


class StoreHealth:
    def __init__(self, where: str, probe: Callable[[], Awaitable[None]], on_change: Callable[[bool], None],
                 retry_every: float = RETRY_EVERY) -> None:
        self.where = where  # the store, as messages name it
        self._on_change = on_change  # (up) -> None: the gauge
        # probe: returns once the store answers; raises why not
        self._reachability = Reachability(probe, retry_every, self._went_down, self._came_back)

    @property
    def reason(self) -> str | None:
        """Why it is down; None while up."""
        return self._reachability.reason

    def went_down(self, reason: str) -> None:
        self._reachability.failed(reason)

    def state(self) -> str:
        """For /ready: "up" or "down: <reason>"."""
        return "up" if self.reason is None else f"down: {self.reason}"

    def close(self) -> None:
        self._reachability.close()

    def _went_down(self, reason: str) -> None:
        self._on_change(False)
        warn(logger, "the object store %s is unreachable (%s): warm pulls of its caches get 503; retrying every %g s",
             self.where, reason, self._reachability.every)

    def _came_back(self) -> None:
        self._on_change(True)
        warn(logger, "the object store %s is reachable again", self.where)
