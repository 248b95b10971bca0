"""Faults around the proxy, through a running stack of its own: a pull log that cannot be written
(a full disk), an upstream and a token server that answer something that is not HTTP. Each
fault gets a clear answer or one warning, never a traceback, and stops nothing else."""

from __future__ import annotations

import json

import pytest

from tests.support.fakes import Challenger, NotHttp
from tests.support.parts import PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Stack, http_get, raw_exchange, raw_request, split_responses

PORT = PORT_BASES["test_faults"]
GHCR = f"ghcr.io.{TEST_DOMAIN}:{PORT}"
QUAY = f"quay.io.{TEST_DOMAIN}:{PORT}"


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    not_http = NotHttp(PORT + UPSTREAM_OFFSET).start()
    challenger = Challenger(PORT + UPSTREAM_OFFSET + 1, realm=f"{not_http.url}/token").start()
    stack = Stack(tmp_path_factory.mktemp("faults"), {
        "REGCACHE_PORT": str(PORT),
        "REGCACHE_REGISTRIES": "GHCR,QUAY,DOCKERHUB",
        "GHCR_UPSTREAM": not_http.url, "GHCR_CACHE": "none",  # its /v2/ is not HTTP
        "DOCKERHUB_UPSTREAM": not_http.url, "DOCKERHUB_CACHE": f"http://127.0.0.1:{PORT + 1}",  # cached, the same
        "DOCKERHUB_EGRESS_PORT": str(PORT + 80),
        "QUAY_UPSTREAM": challenger.url, "QUAY_CACHE": "none",  # its token realm is not HTTP
        "REGCACHE_PULL_LOG": "/dev/full",  # every write fails with ENOSPC, as on a full disk
    }).start()
    yield stack, not_http, challenger
    stack.stop()
    challenger.stop()
    not_http.stop()


def test_a_non_http_answer_from_an_upstream_or_its_token_server_is_a_502_and_nothing_goes_upstream(faults):
    stack, not_http, challenger = faults
    for host, says in [(GHCR, "upstream"), (QUAY, "token server")]:
        status, _, body = http_get(f"http://127.0.0.1:{PORT}/v2/library/small/manifests/1.0", host=host, timeout=20)
        error = json.loads(body)["errors"][0]
        assert (status, error["code"]) == (502, "UNAVAILABLE")
        assert error["message"].startswith(says) and "Bad status line" in error["message"]  # aiohttp's words
    assert not_http.requests[0] == "GET /v2/ HTTP/1.1"  # ghcr.io's challenge, then quay.io's token request
    assert [r.split("?")[0] for r in not_http.requests[1:]] == ["GET /token"]
    assert challenger.paths == ["/v2/"]  # the manifest request never went upstream without credentials
    assert not [line for line in stack.output if "Traceback" in line or "addon error" in line.lower()]


def test_a_pull_log_that_cannot_be_written_stops_neither_answers_nor_metrics(faults):
    stack = faults[0]
    for _ in range(5):
        status, _, _ = http_get(f"http://127.0.0.1:{PORT}/v2/", host=f"unmapped.io.{TEST_DOMAIN}:{PORT}")
        assert status == 404
    key = ("regcache_requests_total", (("cache", "none"), ("kind", "none"), ("registry", "none"), ("status", "404")))
    assert stack.metrics().get(key, 0) >= 5
    warnings = [line for line in stack.output if "the pull log failed" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert not [line for line in stack.output if "Traceback" in line]


def test_a_head_answered_502_by_the_egress_listener_has_no_body_so_the_cache_can_go_on(faults):
    """What docker.io's cache sees when its upstream does not speak HTTP (listed after the tests
    above, which count what the fake upstream was asked)."""
    stack = faults[0]
    egress = f"127.0.0.1:{PORT + 80}"  # docker.io's
    reply = raw_exchange(PORT + 80, raw_request("HEAD /v2/library/small/manifests/1.0 HTTP/1.1", host=egress, close=False)
                         + raw_request("GET /v2/library/small/manifests/1.0 HTTP/1.1", host=egress))
    (head_status, head_headers, _), (get_status, get_headers, body) = split_responses(reply, ["HEAD", "GET"])
    assert head_status == get_status == 502 and b"Bad status line" in body
    assert head_headers["content-length"] == get_headers["content-length"]
    assert not [line for line in stack.output if "Traceback" in line]
