"""Metrics without mitmproxy: client requests from PullRecords, and the upstream-side functions."""

from __future__ import annotations

import pytest

from regcache_core.observe.metrics import Metrics
from regcache_core.observe.pull_log import PullRecord


def record(**fields) -> PullRecord:
    defaults = dict(time="2026-01-01T00:00:00.000+00:00", client="10.0.0.1", registry="docker.io",
                    repository="library/small", kind="blob", reference="sha256:" + "a" * 64, method="GET",
                    status=200, bytes=1000, duration_ms=250, backend="http://127.0.0.1:5001")
    return PullRecord(**(defaults | fields))


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_observe_counts_requests_bytes_and_durations_by_registry_kind_status_and_cache():
    metrics = Metrics()
    metrics.observe(record())
    metrics.observe(record(bytes=500, cache="hit", duration_ms=20))
    metrics.observe(record(bytes=0, status=404, kind="manifest"))
    metrics.observe(record(registry=None, repository=None, kind=None, status=404, bytes=80))
    blob = dict(registry="docker.io", kind="blob", status="200")
    assert value(metrics, "regcache_requests_total", cache="none", **blob) == 1
    assert value(metrics, "regcache_requests_total", cache="hit", **blob) == 1
    assert value(metrics, "regcache_response_bytes_total", cache="none", **blob) == 1000
    assert value(metrics, "regcache_response_bytes_total", cache="hit", **blob) == 500
    assert value(metrics, "regcache_requests_total", registry="docker.io", kind="manifest", status="404", cache="none") == 1
    assert value(metrics, "regcache_requests_total", registry="none", kind="none", status="404", cache="none") == 1
    durations = dict(registry="docker.io", kind="blob", cache="none")
    assert value(metrics, "regcache_request_duration_seconds_sum", **durations) == 0.25
    assert value(metrics, "regcache_request_duration_seconds_bucket", le="0.25", **durations) == 1
    assert value(metrics, "regcache_request_duration_seconds_bucket", le="0.1", **durations) == 0


def test_in_flight_goes_up_and_down():
    metrics = Metrics()
    metrics.request_started()
    metrics.request_started()
    metrics.request_finished()
    assert value(metrics, "regcache_requests_in_flight") == 1


def test_upstream_fetches_errors_and_tokens():
    metrics = Metrics()
    metrics.upstream_result("docker.io", 200)
    metrics.upstream_result("docker.io", 429)
    metrics.upstream_result("docker.io", 429)
    metrics.upstream_result("ghcr.io", None)
    metrics.upstream_result("ghcr.io", None)
    metrics.token_fetch("docker.io", "ok")
    metrics.token_fetch("docker.io", "denied")
    assert value(metrics, "regcache_upstream_fetches_total", registry="docker.io", status="429") == 2
    assert value(metrics, "regcache_upstream_fetches_total", registry="docker.io", status="200") == 1
    assert value(metrics, "regcache_upstream_errors_total", registry="ghcr.io") == 2
    assert value(metrics, "regcache_token_fetches_total", registry="docker.io", outcome="denied") == 1
    with pytest.raises(ValueError, match="outcome"):
        metrics.token_fetch("docker.io", "maybe")


def test_rate_limit_gauge_per_registry_keeps_the_last_value():
    metrics = Metrics()
    metrics.rate_limit("docker.io", 100)
    metrics.rate_limit("docker.io", 99)
    assert value(metrics, "regcache_upstream_ratelimit_remaining", registry="docker.io") == 99
    assert value(metrics, "regcache_upstream_ratelimit_remaining", registry="ghcr.io") is None


def test_exposition_is_the_prometheus_text_format_of_this_registry_only():
    metrics = Metrics()
    metrics.observe(record())
    text = metrics.exposition().decode()
    assert 'regcache_requests_total{cache="none",kind="blob",registry="docker.io",status="200"} 1.0' in text
    assert "process_resident_memory_bytes" in text
    assert "python_gc_objects_collected_total" not in text  # the global default registry stays out


def test_sent_bytes_by_path_tell_the_data_plane_from_the_proxy():
    metrics = Metrics()
    metrics.observe(record(bytes=700, backend="dataplane", cache="hit"))
    metrics.observe(record(bytes=300))  # a cache's answer, through the proxy
    metrics.observe(record(bytes=50, backend=None, status=307))  # the proxy's own answer
    assert value(metrics, "regcache_sent_bytes_total", registry="docker.io", path="dataplane") == 700
    assert value(metrics, "regcache_sent_bytes_total", registry="docker.io", path="proxy") == 350


def test_spool_downloads_running_are_read_when_scraped():
    metrics = Metrics()
    running = [0]
    metrics.watch_spool_downloads(lambda: running[0])
    running[0] = 3
    assert "regcache_spool_downloads_running 3.0" in metrics.exposition().decode()


def test_rare_events_are_at_0_before_the_first_one():
    metrics = Metrics()
    metrics.registries_known(["docker.io", "ghcr.io"])
    assert value(metrics, "regcache_upstream_errors_total", registry="ghcr.io") == 0
    assert value(metrics, "regcache_spool_followers_total", registry="docker.io") == 0
    assert value(metrics, "regcache_client_refusals_total", reason="head_too_large") == 0
