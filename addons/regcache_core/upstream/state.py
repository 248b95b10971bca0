"""Whether each registry's upstream can be reached, and why not.

An upstream goes down when an exchange with it gets no HTTP answer in time (timeout, refused,
name lookup failed, ...). While it is down nobody waits for it: requests that need it fail at
once, cached content is served as it is, and one background probe per registry (`probe`, a
`GET /v2/` bounded like every upstream exchange) asks again every RETRY_EVERY seconds. Any
HTTP answer brings it back. One WARNING line when it goes down and one when it is back, never
one per request; /ready's body and the `regcache_upstream_up` gauge show the state.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..observe import warn
from ..observe.metrics import Metrics

logger = logging.getLogger(__name__)

RETRY_EVERY = 5.0  # seconds between probes of a down upstream


def failure_reason(error: BaseException | str) -> str:
    """Why an exchange got no answer, in the words the pull log, errors and warnings use."""
    if isinstance(getattr(error, "reason", None), BaseException):  # urllib's URLError wraps the cause
        return failure_reason(error.reason)
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, socket.gaierror):
        return "name lookup failed"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    text = str(error)
    lowered = text.lower()
    if "refused" in lowered or "errno 111" in lowered:
        return "refused"
    if any(words in lowered for words in ("name lookup failed", "name or service not known", "name resolution", "nodename")):
        return "name lookup failed"
    return text or type(error).__name__


class UpstreamStatus(Protocol):
    """Whether each registry's upstream can be reached, as every part of regcache sees it.
    UpstreamState is this process's; a shared one would tell every replica."""

    def reason_down(self, registry: str) -> str | None: ...

    def went_down(self, registry: str, upstream: str, reason: str) -> None: ...

    def answered(self, registry: str, upstream: str) -> None: ...

    def states(self, registries: list[str]) -> dict[str, str]: ...


class UpstreamState:
    def __init__(self, metrics: Metrics, probe: Callable[[str], Awaitable[None]], retry_every: float = RETRY_EVERY) -> None:
        self.metrics = metrics
        self._probe = probe  # (upstream base URL) -> None once it answers; raises why not
        self._retry_every = retry_every
        self._down: dict[str, str] = {}  # registry name -> reason
        self._probes: dict[str, asyncio.Task] = {}
        # (registry, upstream, reason or None when back) on each change: how replicas tell each other
        self.on_change: Callable[[str, str, str | None], None] = lambda registry, upstream, reason: None

    def reason_down(self, registry: str) -> str | None:
        """Why `registry`'s upstream is down, or None while it is up (or not known to be down)."""
        return self._down.get(registry)

    def went_down(self, registry: str, upstream: str, reason: str) -> None:
        if registry in self._down:
            self._down[registry] = reason
            return
        self._down[registry] = reason
        self.metrics.upstream_up(registry, False)
        self.on_change(registry, upstream, reason)
        warn(logger, "upstream %s of %s is unreachable (%s): serving what the cache holds; retrying every %g s",
              upstream, registry, reason, self._retry_every)
        self._probes[registry] = asyncio.get_running_loop().create_task(self._retry(registry, upstream))

    def answered(self, registry: str, upstream: str) -> None:
        """The upstream gave an HTTP answer (any status): it is reachable."""
        self.metrics.upstream_up(registry, True)
        if self._down.pop(registry, None) is None:
            return
        self.on_change(registry, upstream, None)
        warn(logger, "upstream %s of %s is reachable again", upstream, registry)
        if (probe := self._probes.pop(registry, None)) is not None and probe is not asyncio.current_task():
            probe.cancel()

    def states(self, registries: list[str]) -> dict[str, str]:
        """registry name -> "up" or "down: <reason>", for /ready."""
        return {name: f"down: {self._down[name]}" if name in self._down else "up" for name in registries}

    def close(self) -> None:
        for probe in self._probes.values():
            probe.cancel()
        self._probes.clear()

    async def _retry(self, registry: str, upstream: str) -> None:
        while registry in self._down:
            await asyncio.sleep(self._retry_every)
            try:
                await self._probe(upstream)
            except Exception as e:  # noqa: BLE001 - any failure means: still down
                self._down[registry] = failure_reason(e)
            else:
                self._probes.pop(registry, None)
                self.answered(registry, upstream)
