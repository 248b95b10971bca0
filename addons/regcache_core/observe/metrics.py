"""Prometheus metrics: what clients asked and got, and what regcache asked of upstreams.

Plain methods, no mitmproxy: the addon feeds client requests in (one PullRecord each, the
same record the pull log gets), the upstream side calls `upstream_result`, `token_fetch` and
`rate_limit` itself. Metrics live in their own CollectorRegistry, so
nothing else in the process (mitmproxy's libraries) can add series to /metrics; the proxy
process's own memory and CPU (process_*) are added on purpose.

Label values come from routing (mapped registry names, a handful of kinds), HTTP status codes
and exception class names: all bounded, so no client can make the series count grow.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .pull_log import DATAPLANE_BACKEND, PullRecord

EXPOSITION_CONTENT_TYPE = CONTENT_TYPE_LATEST
NONE = "none"  # label value for "not known" or "not applicable": refused requests, cache unknown
TOKEN_OUTCOMES = ("ok", "denied", "error")  # got a token, 401/403 from the realm, no usable answer
# Why a client was refused before routing: its address is outside REGCACHE_CLIENTS, its
# credentials are wrong, or it sent none while REGCACHE_HTPASSWD is set (a client's first try);
# or its request head outgrew REGCACHE_MAX_REQUEST_HEAD (on any listener).
REFUSAL_REASONS = ("network", "credentials", "no_credentials", "head_too_large")
# From a cached manifest (milliseconds) to a big layer over a slow link (minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        client = ("registry", "kind", "status", "cache")
        self.requests = Counter(
            "regcache_requests", "Client requests answered, by registry, kind, status code and cache hit/miss/none.",
            client, registry=self.registry)
        self.bytes = Counter(
            "regcache_response_bytes", "Body bytes sent to clients.", client, registry=self.registry)
        self.sent_bytes = Counter(
            "regcache_sent_bytes", "Body bytes sent to clients, by path: dataplane (blobs the data plane's sendfile "
            "workers sent from a cache or a spool) or proxy (all else, sent by mitmproxy).",
            ("registry", "path"), registry=self.registry)
        self.duration = Histogram(
            "regcache_request_duration_seconds", "From request arrival to the last byte sent (or the failure).",
            ("registry", "kind", "cache"), buckets=DURATION_BUCKETS, registry=self.registry)
        self.in_flight = Gauge(
            "regcache_requests_in_flight", "Client requests routed to a backend and not finished yet.",
            registry=self.registry)
        self.spool_downloads = Gauge(
            "regcache_spool_downloads_running", "Cold blobs the proxy is downloading from upstream into a spool, "
            "followed on the data plane.", registry=self.registry)
        self.upstream_fetches = Counter(
            "regcache_upstream_fetches", "Requests regcache itself sent to an upstream registry, by answer status.",
            ("registry", "status"), registry=self.registry)
        self.upstream_errors = Counter(
            "regcache_upstream_errors", "Upstream requests that got no HTTP answer (refused, reset, timed out, bad TLS).",
            ("registry",), registry=self.registry)
        self.spool_followers = Counter(
            "regcache_spool_followers", "Fetches of a cold blob sent to its spool on the data plane (the proxy's one "
            "download of it): caches' upstream fetches, and clients' GETs.", ("registry",), registry=self.registry)
        self.token_fetches = Counter(
            "regcache_token_fetches", "Bearer token requests to an upstream's token realm, by outcome (ok, denied, error).",
            ("registry", "outcome"), registry=self.registry)
        self.rate_limit_remaining = Gauge(
            "regcache_upstream_ratelimit_remaining", "Pulls left in the upstream's window, from its ratelimit-remaining header (Docker Hub).",
            ("registry",), registry=self.registry)
        self.evicted_blobs = Counter(
            "regcache_evicted_blobs", "Blobs and manifests the disk budget removed from a cache.",
            ("registry",), registry=self.registry)
        self.evicted_bytes = Counter(
            "regcache_evicted_bytes", "Bytes the disk budget removed from a cache.", ("registry",), registry=self.registry)
        self.eviction_skipped = Counter(
            "regcache_eviction_skipped_blobs", "Blobs due for eviction that a budget run left because a pull was "
            "reading them (each run counts them again).", ("registry",), registry=self.registry)
        self.disk_used = Gauge(
            "regcache_cache_disk_used_bytes", "Bytes a cache run here holds in its storage, as of the last budget run.",
            ("registry",), registry=self.registry)
        self.disk_budget = Gauge(
            "regcache_cache_disk_budget_bytes", "A cache's own disk budget (K_MAX_DISK).", ("registry",), registry=self.registry)
        self.total_disk_budget = Gauge(
            "regcache_disk_budget_bytes", "The disk budget over all caches run here (REGCACHE_MAX_DISK).",
            registry=self.registry)
        self.client_refusals = Counter(
            "regcache_client_refusals", "Client requests refused before routing, by reason: network (403, outside "
            "REGCACHE_CLIENTS), credentials (401, wrong ones), no_credentials (401, none sent: a client's first try), "
            "head_too_large (431, a request head over REGCACHE_MAX_REQUEST_HEAD).",
            ("reason",), registry=self.registry)
        for reason in REFUSAL_REASONS:  # at 0 from the start: a dashboard's rate() then shows 0, not "no data"
            self.client_refusals.labels(reason)
        self.upstream_reachable = Gauge(
            "regcache_upstream_up", "1 while the registry's upstream answers, 0 while it cannot be reached (see /ready's body for why).",
            ("registry",), registry=self.registry)
        self.shared_state = Gauge(
            "regcache_shared_state_up", "1 while the Redis that replicas share (REGCACHE_REDIS_URL) answers, 0 while "
            "each replica goes on with state of its own; absent on one node.", registry=self.registry)
        self.object_store = Gauge(
            "regcache_object_store_up", "1 while the object store of the caches on S3 (K_STORAGE=s3://) answers, 0 "
            "while it cannot be reached; absent without such caches.", registry=self.registry)

    def observe(self, record: PullRecord) -> None:
        """Count one finished or failed client request."""
        registry, kind, cache = record.registry or NONE, record.kind or NONE, record.cache or NONE
        labels = (registry, kind, str(record.status), cache)
        self.requests.labels(*labels).inc()
        self.bytes.labels(*labels).inc(record.bytes)
        self.sent_bytes.labels(registry, "dataplane" if record.backend == DATAPLANE_BACKEND else "proxy").inc(record.bytes)
        self.duration.labels(registry, kind, cache).observe(record.duration_ms / 1000)

    def registries_known(self, registries: list[str]) -> None:
        """The configured registries' counters of rare events, at 0 until one happens."""
        for registry in registries:
            self.upstream_errors.labels(registry)
            self.spool_followers.labels(registry)

    def request_started(self) -> None:
        self.in_flight.inc()

    def request_finished(self) -> None:
        self.in_flight.dec()

    def upstream_result(self, registry: str, status: int | None) -> None:
        """A request regcache sent upstream ended: with an HTTP status (401, 429 and 5xx show up by
        code), or None when it got no answer."""
        if status is None:
            self.upstream_errors.labels(registry).inc()
        else:
            self.upstream_fetches.labels(registry, str(status)).inc()

    def upstream_up(self, registry: str, up: bool) -> None:
        self.upstream_reachable.labels(registry).set(1 if up else 0)

    def shared_state_up(self, up: bool) -> None:
        self.shared_state.set(1 if up else 0)

    def object_store_up(self, up: bool) -> None:
        self.object_store.set(1 if up else 0)

    def watch_spool_downloads(self, running: Callable[[], int]) -> None:
        """Read the number of spool downloads running when scraped."""
        self.spool_downloads.set_function(running)

    def spool_follower(self, registry: str) -> None:
        self.spool_followers.labels(registry).inc()

    def client_refused(self, reason: str) -> None:
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"client refusal reason {reason!r} is not one of {REFUSAL_REASONS}")
        self.client_refusals.labels(reason).inc()

    def token_fetch(self, registry: str, outcome: str) -> None:
        if outcome not in TOKEN_OUTCOMES:
            raise ValueError(f"token fetch outcome {outcome!r} is not one of {TOKEN_OUTCOMES}")
        self.token_fetches.labels(registry, outcome).inc()

    def rate_limit(self, registry: str, remaining: int) -> None:
        """Pulls left, from the upstream's `ratelimit-remaining` header (see upstream_signals)."""
        self.rate_limit_remaining.labels(registry).set(remaining)

    def budget_run(self, registry: str, used: int, budget: int | None, evicted_blobs: int, evicted_bytes: int,
                   skipped: int) -> None:
        """One cache's part of a disk budget run."""
        self.disk_used.labels(registry).set(used)
        if budget is not None:
            self.disk_budget.labels(registry).set(budget)
        self.evicted_blobs.labels(registry).inc(evicted_blobs)
        self.evicted_bytes.labels(registry).inc(evicted_bytes)
        self.eviction_skipped.labels(registry).inc(skipped)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

