"""What upstream answers tell about the upstream itself: rate limits and 429s.

`observe()` is the one place they are read, logged (one line, registry named) and handed to
the metrics. `regcache up` shows warnings only, so what needs a person is a warning: a 429, and
a rate limit running low (under LOW_SHARE of it left); the count after every other fetch is an
info line (and always in the metrics).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..observe.metrics import Metrics

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
