"""Whether the object store can be reached, as the proxy sees it.

It goes down when a call gets no answer it can serve with (StoreUnreachable: no connection, the
deadline passed, a 5xx). While it is down nobody waits for it: warm pulls of the caches on it
get 503 UNAVAILABLE at once (containerd then falls back to its next host), and one background
probe asks again every RETRY_EVERY seconds; its first answer brings the store back. One WARNING
line each way, never one per request; /ready's body and `regcache_object_store_up` show it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..observe import warn
from ..upstream.state import RETRY_EVERY

logger = logging.getLogger(__name__)


class StoreHealth:
    def __init__(self, where: str, probe: Callable[[], Awaitable[None]], on_change: Callable[[bool], None],
                 retry_every: float = RETRY_EVERY) -> None:
        self.where = where  # the store, as messages name it
        self._probe = probe  # returns once the store answers; raises why not
        self._on_change = on_change  # (up) -> None: the gauge
        self._retry_every = retry_every
        self.reason: str | None = None  # why it is down; None while up
        self._retrying: asyncio.Task | None = None

    def went_down(self, reason: str) -> None:
        first = self.reason is None
        self.reason = reason
        if not first:
            return
        self._on_change(False)
        warn(logger, "the object store %s is unreachable (%s): warm pulls of its caches get 503; retrying every %g s",
              self.where, reason, self._retry_every)
        self._retrying = asyncio.get_running_loop().create_task(self._retry())

    def state(self) -> str:
        """For /ready: "up" or "down: <reason>"."""
        return "up" if self.reason is None else f"down: {self.reason}"

    def close(self) -> None:
        if self._retrying is not None:
            self._retrying.cancel()
            self._retrying = None

    async def _retry(self) -> None:
        while self.reason is not None:
            await asyncio.sleep(self._retry_every)
            try:
                await self._probe()
            except Exception as e:  # noqa: BLE001 - any failure means: still down
                self.reason = str(e) or type(e).__name__
            else:
                self.reason, self._retrying = None, None
                self._on_change(True)
                warn(logger, "the object store %s is reachable again", self.where)
