"""What upstream answers tell about the upstream itself.

UpstreamAnswers is the one path every exchange with an upstream reports through (a cache's or
a client's request through the proxy, a spool's download, a tag's revalidation): the metrics,
the upstream state (reachable or down), upstream auth (a 401 drops the token) and the signals.

Signals are rate limits and 429s: `observe()` is the one place they are read, logged (one line,
registry named) and handed to the metrics. `regcache up` shows warnings only, so what needs a
person is a warning: a 429, and a rate limit running low (under LOW_SHARE of it left); the
count after every other fetch is an info line (and always in the metrics).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Registry
from ..observe.metrics import Metrics
from .auth import UpstreamAuth, UpstreamAuthError
from .state import UpstreamStatus

logger = logging.getLogger(__name__)

LOW_SHARE = 0.1  # warn once fewer than this share of the limit's pulls are left
_COUNT = re.compile(r"\s*(\d+)\s*(?:;\s*w\s*=\s*(\d+))?")  # Docker Hub: "100;w=21600"


@dataclass(frozen=True)
class RateLimit:
    limit: int
    remaining: int
    window_s: int | None  # seconds the limit counts over, when the upstream says


def parse_rate_limit(headers: Mapping[str, str]) -> RateLimit | None:
    limit = _COUNT.match(headers.get("ratelimit-limit", ""))
    remaining = _COUNT.match(headers.get("ratelimit-remaining", ""))
    if not (limit and remaining):
        return None
    window = limit[2] or remaining[2]
    return RateLimit(int(limit[1]), int(remaining[1]), int(window) if window else None)


class UpstreamSignals:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def observe(self, registry: str, status: int, headers: Mapping[str, str]) -> None:
        """One upstream answer. Its status is counted with every upstream fetch (metrics.upstream_result)."""
        if (rate_limit := parse_rate_limit(headers)) is not None:
            self.metrics.rate_limit(registry, rate_limit.remaining)
            window = f" per {rate_limit.window_s} s" if rate_limit.window_s else ""
            level = logging.WARNING if rate_limit.remaining < rate_limit.limit * LOW_SHARE else logging.INFO
            logger.log(level, "upstream %s: %d of %d pulls left%s", registry, rate_limit.remaining, rate_limit.limit, window)
        if status == 429:
            retry = headers.get("retry-after")
            logger.warning("upstream %s answered 429 Too Many Requests%s", registry, f" (retry after {retry})" if retry else "")


class UpstreamAnswers:
    """What each exchange with an upstream showed, reported once, the same way for all of them."""

    def __init__(self, auth: UpstreamAuth, state: UpstreamStatus, metrics: Metrics) -> None:
        self.auth = auth
        self.state = state
        self.metrics = metrics
        self.signals = UpstreamSignals(metrics)

    async def authorization(self, registry: Registry, repository: str | None) -> str | None:
        """Our Authorization header for the upstream (None: it asks for none). Raises
        UpstreamAuthError; an upstream that could not be reached for it is down."""
        try:
            return await self.auth.authorization(registry, repository)
        except UpstreamAuthError as e:
            if e.unreachable:
                self.state.went_down(registry.name, registry.upstream, e.unreachable)
            raise

    def answered(self, registry: Registry, repository: str | None, status: int, headers: Mapping[str, str]) -> None:
        """The upstream answered what we sent it (with our credentials)."""
        self.metrics.upstream_result(registry.name, status)
        self.state.answered(registry.name, registry.upstream)
        self.signals.observe(registry.name, status, headers)
        if status == 401:
            self.auth.refused(registry, repository)
        elif status < 400:
            self.auth.accepted(registry, repository)

    def answered_elsewhere(self, registry: Registry, status: int) -> None:
        """An answer counted as the upstream's that says nothing of the upstream itself: from
        where it redirected to (a CDN), or regcache's own for it (a 503 while it is down)."""
        self.metrics.upstream_result(registry.name, status)

    def failed(self, registry: Registry, down: str | None) -> None:
        """No answer. `down`: why the upstream is unreachable, when that is the cause (None: a
        redirect target failed, the requester left, the answer was not usable)."""
        self.metrics.upstream_result(registry.name, None)
        if down:
            self.state.went_down(registry.name, registry.upstream, down)
