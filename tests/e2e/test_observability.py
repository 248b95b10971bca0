"""End to end: /metrics after a known sequence of requests, /ready and /live, through `regcache up`.

The data plane is off here: every blob is the proxy's own flow, streamed from the cache (the
data plane's records in the metrics are test_dataplane's)."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from tests.support.parts import MANIFEST_TYPES, PORT_BASES, REGISTRY_PROGRAM, TEST_DOMAIN, Stack, docker_io_stack, http_get, pause, poll

PORT = PORT_BASES["test_observability"]
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, upstream) -> Stack:
    stack = docker_io_stack(tmp_path_factory.mktemp("stack"), upstream, PORT, {"REGCACHE_DATAPLANE": "false"}).start()
    yield stack
    assert stack.stop() == 0


def request(path: str, host: str = DOCKER_IO, method: str = "GET") -> tuple[int, bytes]:
    status, _, body = http_get(f"http://127.0.0.1:{PORT}{path}", host=host, method=method,
                               headers={"Accept": MANIFEST_TYPES})
    return status, body


def client_series(metrics: dict, name: str, registry: str, kind: str, status: str, cache: str | None = None) -> float:
    """A client series' value, summed over hit/miss/none unless `cache` picks one."""
    caches = (cache,) if cache else ("hit", "miss", "none")
    return sum(metrics.get((name, (("cache", c), ("kind", kind), ("registry", registry), ("status", status))), 0)
               for c in caches)


def test_metrics_count_a_known_sequence_of_requests(stack, images):
    image = images["small"]
    before = stack.metrics()
    assert request("/v2/")[0] == 200
    manifests = [request(f"/v2/{image.name}/manifests/{image.tag}") for _ in range(2)]
    assert request(f"/v2/{image.name}/manifests/{image.tag}", method="HEAD")[0] == 200
    blobs = [request(f"/v2/{image.name}/blobs/{digest}") for digest in image.blob_digests]
    assert request(f"/v2/{image.name}/manifests/{image.tag}", host=f"unmapped.io.{TEST_DOMAIN}:{PORT}")[0] == 404
    assert {status for status, _ in manifests + blobs} == {200}
    after = stack.metrics()

    def delta(name, *labels):
        return client_series(after, name, *labels) - client_series(before, name, *labels)

    assert delta("regcache_requests_total", "docker.io", "ping", "200") == 1
    assert delta("regcache_requests_total", "docker.io", "manifest", "200") == 3  # 2 GET + 1 HEAD
    assert delta("regcache_response_bytes_total", "docker.io", "manifest", "200") == sum(len(b) for _, b in manifests)
    assert delta("regcache_requests_total", "docker.io", "blob", "200") == len(image.blob_digests)
    assert delta("regcache_response_bytes_total", "docker.io", "blob", "200") == sum(len(b) for _, b in blobs)
    assert delta("regcache_requests_total", "none", "none", "404") == 1
    # The cache fetched every blob upstream (through its egress listener) for these first pulls.
    assert delta("regcache_requests_total", "docker.io", "blob", "200", "miss") == len(image.blob_digests)
    blob_durations = ("regcache_request_duration_seconds_count", (("cache", "miss"), ("kind", "blob"), ("registry", "docker.io")))
    assert after[blob_durations] - before.get(blob_durations, 0) == len(image.blob_digests)
    upstream_blobs = sum(v for (name, labels), v in after.items()
                         if name == "regcache_upstream_fetches_total" and ("registry", "docker.io") in labels)
    assert upstream_blobs >= len(image.blob_digests)
    assert after[("regcache_requests_in_flight", ())] == 0


def test_in_flight_returns_to_zero_when_a_client_drops_a_blob_midway(stack, images):
    image = images["big"]
    layer = image.blob_digests[-1]
    with socket.create_connection(("127.0.0.1", PORT)) as conn:
        conn.sendall(f"GET /v2/{image.name}/blobs/{layer} HTTP/1.1\r\nHost: {DOCKER_IO}\r\n\r\n".encode())
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        assert stack.metrics()[("regcache_requests_in_flight", ())] == 1
    in_flight = poll(lambda: stack.metrics()[("regcache_requests_in_flight", ())], lambda count: count == 0, 15)
    assert in_flight == 0, "the in-flight gauge leaked a dropped request"
    dropped = stack.pull_records_until(lambda records: any(r["reference"] == layer for r in records))
    assert [r for r in dropped if r["reference"] == layer][-1]["error"]


def test_live_answers(stack):
    status, headers, body = stack.admin("/live")
    assert (status, json.loads(body)) == (200, {"live": True})


def test_admin_paths_are_not_reachable_on_the_mirror_port(stack):
    for path in ("/metrics", "/ready", "/live"):
        assert request(path)[0] == 404


def test_readiness_follows_the_cache_backend(stack):
    status, _, body = stack.admin("/ready")
    assert status == 200, body
    assert json.loads(body) == {"ready": True, "proxy": "ok", "backends": {"docker.io": "ok"}, "upstreams": {"docker.io": "up"}}
    cache = stack.child(REGISTRY_PROGRAM)
    pause(cache)  # stopped: it accepts connections (the kernel does) but never answers
    try:
        status, _, body = stack.admin("/ready")
        assert status == 503
        assert json.loads(body)["backends"]["docker.io"].startswith("no answer within")
    finally:
        os.kill(cache, signal.SIGCONT)
    status, _, body = stack.admin("/ready")
    assert status == 200, body
