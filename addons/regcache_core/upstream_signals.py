"""What upstream answers tell about the upstream itself: rate limits and 429s.

`observe()` is the one place they are read, logged (one line, registry named) and kept, so
metrics can be fed from here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

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
    def __init__(self) -> None:
        self.rate_limits: dict[str, RateLimit] = {}  # latest per registry name
        self.throttled: dict[str, int] = {}  # 429 answers per registry name

    def observe(self, registry: str, status: int, headers: Mapping[str, str]) -> None:
        if (rate_limit := parse_rate_limit(headers)) is not None:
            self.rate_limits[registry] = rate_limit
            window = f" per {rate_limit.window_s} s" if rate_limit.window_s else ""
            logger.info("upstream %s: %d of %d pulls left%s", registry, rate_limit.remaining, rate_limit.limit, window)
        if status == 429:
            self.throttled[registry] = self.throttled.get(registry, 0) + 1
            retry = headers.get("retry-after")
            logger.warning("upstream %s answered 429 Too Many Requests%s", registry, f" (retry after {retry})" if retry else "")
