"""Generated requests (hypothesis) against the routing functions and the running proxy: whatever
a client sends, regcache answers with no 5xx of its own and no traceback, and nothing but a
canonical GET or HEAD of a pull path ever reaches a backend (the upstream's and the cache's
access logs say what did). Bounded in examples and time."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support.parts import PORT_BASES, TEST_DOMAIN, raw_exchange
from regcache_core.config import DEFAULTS, parse_config
from regcache_core.routing import MAX_TARGET, Refusal, Target, refuse_malformed, route, route_egress

CONFIG = parse_config({**DEFAULTS, "REGISTRY_DOMAIN": TEST_DOMAIN, "GHCR_CACHE": "none"})
PORT = PORT_BASES["session"]
DIGEST = "sha256:" + "ab" * 32
PULL_PATH = re.compile(r"/v2/(?:[a-z0-9._/-]+/(?:manifests|blobs|tags|referrers)/[^/?]+)?(?:\?.*)?")
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

methods = st.sampled_from(["GET", "HEAD", "get", "hEaD", "Get", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE",
                           "CONNECT", "PROPFIND"]) | st.text(TOKEN_CHARS, min_size=1, max_size=8)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/9.9", "HTTP/2.0", "HTTP/1.2"])
hosts = st.sampled_from([f"docker.io.{TEST_DOMAIN}:{PORT}", f"ghcr.io.{TEST_DOMAIN}:{PORT}", f"unmapped.io.{TEST_DOMAIN}",
                         f"127.0.0.1:{PORT}", "", f"docker.io.{TEST_DOMAIN}.:{PORT}", "[::1]:5000", "a:b:c"])
segments = st.sampled_from(["v2", "library", "small", "big", "manifests", "blobs", "tags", "list", "referrers", "uploads",
                            "_catalog", "1.0", ".INVALID_NAME", DIGEST, "sha256:bad", "..", "%2e%2e", "%00", "", "A",
                            "_regcache", "redirect"]) | st.text(max_size=6)
query_keys = st.sampled_from(["ns", "n", "last", "artifactType", "digest", "mount", "url", "sig"]) | st.text(max_size=4)
query_values = st.sampled_from(["docker.io", "ghcr.io", "quay.io", "0", "2", "-1", "x", "", "%ff", "%"]) | st.text(max_size=6)
queries = st.lists(st.tuples(query_keys, query_values), max_size=5).map(lambda fields: "&".join(f"{k}={v}" for k, v in fields))
# Mostly real pull paths, so that generated methods, queries and headers meet routing's later checks.
pull_paths = st.sampled_from(["/v2/", "/v2/library/small/manifests/1.0", f"/v2/library/small/manifests/{DIGEST}",
                              f"/v2/library/small/blobs/{DIGEST}", "/v2/library/small/tags/list",
                              f"/v2/library/small/referrers/{DIGEST}", "/_regcache/redirect"])
built_paths = st.builds(lambda parts, leading: ("/" if leading else "") + "/".join(parts), st.lists(segments, max_size=7), st.booleans())
targets = st.builds(lambda path, query: path + (f"?{query}" if query else ""), pull_paths | built_paths, queries)


def pull_only(decision: Target | Refusal, method: str) -> None:
    if isinstance(decision, Refusal):
        assert 400 <= decision.status < 500
        return
    assert method in ("GET", "HEAD")
    assert decision.path.isascii() and PULL_PATH.fullmatch(decision.path), decision.path


@settings(max_examples=400, deadline=None)
@given(methods, versions, hosts | st.text(max_size=20), targets | st.text(max_size=30), st.booleans(), st.booleans())
def test_routing_lets_only_canonical_pulls_through(method, version, host, target, has_body, proxy_form):
    decision = refuse_malformed(method, version, target, has_body) or route(CONFIG, method, host, target, proxy_form)
    pull_only(decision, method)
    if isinstance(decision, Target):
        assert version in ("HTTP/1.0", "HTTP/1.1") and not has_body and not proxy_form
        assert len(target) <= MAX_TARGET and decision.path.partition("?")[0] == target.partition("?")[0]
    egress = refuse_malformed(method, version, target, has_body) or route_egress(CONFIG.registry("docker.io"), method, target)
    pull_only(egress, method)


headers = st.lists(st.sampled_from([
    "Accept: application/vnd.oci.image.manifest.v1+json", "Authorization: Bearer client-secret", "Content-Length: 0",
    "Content-Length: 3", "Transfer-Encoding: chunked", "Expect: 100-continue", "Range: bytes=0-10", "X-Forwarded-For: 10.0.0.1",
]), max_size=3, unique=True)
raw_targets = targets | st.builds(lambda path, data: path + data.decode("latin-1"), pull_paths, st.binary(max_size=12))


def raw_request(method: str, target: str, version: str, host: str, extra: list[str]) -> bytes:
    body = b"abc" if "Content-Length: 3" in extra else b"3\r\nabc\r\n0\r\n\r\n" if "Transfer-Encoding: chunked" in extra else b""
    if "Content-Length: 3" in extra and "Transfer-Encoding: chunked" in extra:
        extra = [line for line in extra if line != "Content-Length: 3"]  # that is the smuggling test's
    head = [f"{method} {target or '/'} {version}", f"Host: {host}", *extra, "Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1", "replace") + body


def status_of(reply: bytes) -> tuple[int | None, bytes]:
    match = re.match(rb"HTTP/1\.[01] ([0-9]{3}) .*?\r\n\r\n", reply, re.S)
    return (int(match[1]), match[0]) if match else (None, reply[:200])


@pytest.fixture
def backends_before(stack, upstream) -> tuple[int, int]:
    """How many requests the upstream and the cache had answered before the first example (other
    tests push to the upstream directly)."""
    return len(upstream.access_log()), len(stack.cache_access_log())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(methods, raw_targets, versions, hosts, headers)
def test_the_running_proxy_answers_generated_requests_and_forwards_only_canonical_pulls(
        stack, upstream, backends_before, method, target, version, host, extra):
    reply = raw_exchange(stack.port, raw_request(method, target, version, host, extra), timeout=10)
    status, head = status_of(reply)
    # mitmproxy refuses some request lines itself (400, its HTML page); any answer is a 1.x status line
    assert status is not None, head
    from_backend = b"docker-distribution-api-version" in head.lower()
    assert status < 500 or from_backend, head
    upstream_before, cache_before = backends_before
    new = upstream.access_log()[upstream_before:] + stack.cache_access_log()[cache_before:]
    assert all(line.method in ("GET", "HEAD") and PULL_PATH.fullmatch(line.path) for line in new), new
    assert not [line for line in stack.output if "Traceback" in line or "has crashed" in line]
