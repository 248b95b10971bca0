"""Whether each registry's upstream can be reached, and why not.

An upstream goes down when an exchange with it gets no HTTP answer in time (timeout, refused,
name lookup failed, ...). While it is down nobody waits for it: requests that need it fail at
once, cached content is served as it is, and one background probe per registry (`probe`, a
`GET /v2/` bounded like every upstream exchange) asks again every RETRY_EVERY seconds. Any
HTTP answer brings it back (reachability.py). One WARNING line when it goes down and one when it
is back, never one per request; /ready's body and the `regcache_upstream_up` gauge show the state.

What other replicas say (cluster/upstream.py) is a hint this replica checks with a probe of its
own (`told_down`, `told_up`): its own network decides.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..observe import warn
from ..observe.metrics import Metrics
from ..reachability import Reachability

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
        self._registries: dict[str, Reachability] = {}  # registry name -> its upstream's
        self._upstreams: dict[str, str] = {}  # registry name -> its upstream base URL, as last named
        # (registry, upstream, reason or None when back) on each change this process found: how
        # replicas tell each other
        self.on_change: Callable[[str, str, str | None], None] = lambda registry, upstream, reason: None

    def reason_down(self, registry: str) -> str | None:
        """Why `registry`'s upstream is down, or None while it is up (or not known to be down).
        While another replica's word is being checked, that word: nobody waits meanwhile."""
        if (upstream := self._registries.get(registry)) is None:
            return None
        return upstream.reason or upstream.hint

    def found_down(self, registry: str) -> str | None:
        """Why this replica found `registry`'s upstream down; None while it is up here, or only
        another replica's word is being checked: what this replica tells the others."""
        upstream = self._registries.get(registry)
        return None if upstream is None else upstream.reason

    def went_down(self, registry: str, upstream: str, reason: str) -> None:
        self._of(registry, upstream).failed(reason)

    def answered(self, registry: str, upstream: str) -> None:
        """The upstream gave an HTTP answer (any status): it is reachable."""
        self.metrics.upstream_up(registry, True)
        self._of(registry, upstream).answered()

    def told_down(self, registry: str, upstream: str, hint: str) -> None:
        """Another replica found it down: skip it while a probe of this replica's checks."""
        self._of(registry, upstream).told_down(hint)

    def told_up(self, registry: str, upstream: str) -> None:
        """Another replica found it back: if it is down here, probe it now."""
        self._of(registry, upstream).told_up()

    def states(self, registries: list[str]) -> dict[str, str]:
        """registry name -> "up", "down: <reason>" or "checking: <another replica's word>", for /ready."""
        states = {}
        for name in registries:
            upstream = self._registries.get(name)
            if upstream is not None and upstream.reason is not None:
                states[name] = f"down: {upstream.reason}"
            elif upstream is not None and upstream.hint is not None:
                states[name] = f"checking: {upstream.hint}"
            else:
                states[name] = "up"
        return states

    def close(self) -> None:
        for upstream in self._registries.values():
            upstream.close()

    def _of(self, registry: str, upstream: str) -> Reachability:
        self._upstreams[registry] = upstream
        if (reachability := self._registries.get(registry)) is None:
            reachability = self._registries[registry] = Reachability(
                lambda: self._probe(self._upstreams[registry]), self._retry_every,
                lambda reason: self._went_down(registry, reason), lambda: self._came_back(registry), failure_reason)
        return reachability

    def _went_down(self, registry: str, reason: str) -> None:
        upstream = self._upstreams[registry]
        self.metrics.upstream_up(registry, False)
        self.on_change(registry, upstream, reason)
        warn(logger, "upstream %s of %s is unreachable (%s): serving what the cache holds; retrying every %g s",
             upstream, registry, reason, self._retry_every)

    def _came_back(self, registry: str) -> None:
        upstream = self._upstreams[registry]
        self.metrics.upstream_up(registry, True)
        self.on_change(registry, upstream, None)
        warn(logger, "upstream %s of %s is reachable again", upstream, registry)
