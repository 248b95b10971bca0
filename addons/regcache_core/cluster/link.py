"""The link to the Redis that replicas share (REGCACHE_REDIS_URL).

Redis trouble never fails a pull: every call has a deadline (REGCACHE_REDIS_TIMEOUT), and a call
that fails or misses it marks the link down. While it is down, calls raise SharedStateDown at once
(no request pays the deadline again) and the callers go on with their per-replica state; a probe
asks Redis again every PROBE_INTERVAL seconds and marks the link up when it answers (reachability.py).
Each change is said once: a warning line, the `regcache_shared_state_up` gauge, and `/ready`'s detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.asyncio.retry import Retry

from ..observe import warn
from ..reachability import Reachability, exception_text

logger = logging.getLogger(__name__)

T = TypeVar("T")
PROBE_INTERVAL = 1.0  # seconds between probes while Redis is down
MAX_CONNECTIONS = 64  # to Redis, per replica: calls are short


class SharedStateDown(Exception):
    """Redis cannot be used now: go on with this replica's own state."""


def describe_url(url: str) -> str:
    """Where the URL leads, for logs and /ready: scheme, host, port and db, never a password."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path or ''}"


class RedisLink:
    def __init__(self, url: str, timeout: float, on_change: Callable[[bool], None] = lambda up: None,
                 quiet: bool = False) -> None:
        self.where = describe_url(url)
        self.timeout = timeout
        self.on_change = on_change  # (up): the metric
        self.quiet = quiet  # a data-plane worker's: its replica's proxy says when Redis goes and comes back
        # No retries of its own: one deadline per call is the whole budget, and a failure goes to
        # the per-replica state at once.
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           retry=Retry(NoBackoff(), 0), max_connections=MAX_CONNECTIONS)
        self.outages = 0  # times it went down: a listener that saw one may have missed messages
        self.reachability = Reachability(self._ping, PROBE_INTERVAL, self._went_down, self._came_back, _reason)

    @property
    def up(self) -> bool:
        return self.reachability.up

    def state(self) -> str:
        """For /ready: "ok", or why replicas go on alone."""
        return "ok" if self.up else f"down ({self.reachability.reason}): each replica uses state of its own"

    async def call(self, operation: Callable[[redis.Redis], Awaitable[T]]) -> T:
        """`operation(client)` within the deadline; SharedStateDown when Redis cannot answer."""
        if not self.up:
            raise SharedStateDown(self.reachability.reason)
        try:
            async with asyncio.timeout(self.timeout):
                return await operation(self.client)
        except (RedisError, OSError, TimeoutError) as e:
            self.reachability.failed(_reason(e))
            raise SharedStateDown(self.reachability.reason) from None

    async def close(self) -> None:
        self.reachability.close()
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()

    def _went_down(self, reason: str) -> None:
        self.outages += 1
        if not self.quiet:
            warn(logger, "regcache: shared state at %s unreachable (%s); each replica goes on with state of its own "
                         "until it is back", self.where, reason)
        self.on_change(False)

    def _came_back(self) -> None:
        if not self.quiet:
            warn(logger, "regcache: shared state at %s is back; replicas share state again", self.where)
        self.on_change(True)

    async def _ping(self) -> None:
        async with asyncio.timeout(self.timeout):
            await self.client.ping()


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return exception_text(error)
