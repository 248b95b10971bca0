"""Upstream signals: Docker Hub's rate-limit headers and 429s, logged and kept in the metrics."""

from __future__ import annotations

import logging

import pytest

from regcache_core.observe.metrics import Metrics
from regcache_core.upstream.signals import RateLimit, UpstreamSignals, parse_rate_limit


@pytest.mark.parametrize("headers, expected", [
    ({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"}, RateLimit(100, 76, 21600)),
    ({"ratelimit-limit": "200", "ratelimit-remaining": "0"}, RateLimit(200, 0, None)),
    ({"ratelimit-remaining": "76;w=21600"}, None),  # a count without its limit says little
    ({"ratelimit-limit": "lots", "ratelimit-remaining": "some"}, None),
    ({}, None),
])
def test_parse_rate_limit(headers, expected):
    assert parse_rate_limit(headers) == expected


def test_rate_limit_goes_to_the_metrics_and_429_is_logged_with_the_registry(caplog):
    metrics = Metrics()
    signals = UpstreamSignals(metrics)
    signals.observe("docker.io", 200, {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "99;w=21600"})
    assert metrics.registry.get_sample_value("regcache_upstream_ratelimit_remaining", {"registry": "docker.io"}) == 99
    with caplog.at_level(logging.WARNING):
        signals.observe("docker.io", 429, {"retry-after": "60"})
    assert [r.getMessage() for r in caplog.records] == [
        "upstream docker.io answered 429 Too Many Requests (retry after 60)"
    ]


@pytest.mark.parametrize("remaining, level", [(99, logging.INFO), (10, logging.INFO), (9, logging.WARNING), (0, logging.WARNING)])
def test_a_rate_limit_running_low_is_a_warning(caplog, remaining, level):
    with caplog.at_level(logging.INFO):
        UpstreamSignals(Metrics()).observe("docker.io", 200, {"ratelimit-limit": "100", "ratelimit-remaining": str(remaining)})
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(level, f"upstream docker.io: {remaining} of 100 pulls left")]
