"""Faults around the proxy, through a running stack of its own: a pull log that cannot be written
(a full disk), an upstream and a token server that answer something that is not HTTP. Each
fault gets a clear answer or one warning, never a traceback, and stops nothing else."""

from __future__ import annotations

import json

import pytest

from fakes import Challenger, NotHttp
from parts import PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Stack, http_get

PORT = PORT_BASES["test_faults"]
GHCR = f"ghcr.io.{TEST_DOMAIN}:{PORT}"
QUAY = f"quay.io.{TEST_DOMAIN}:{PORT}"


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    not_http = NotHttp(PORT + UPSTREAM_OFFSET).start()
    challenger = Challenger(PORT + UPSTREAM_OFFSET + 1, realm=f"{not_http.url}/token").start()
    stack = Stack(tmp_path_factory.mktemp("faults"), {
        "REGCACHE_PORT": str(PORT),
        "REGCACHE_REGISTRIES": "GHCR,QUAY",
        "GHCR_UPSTREAM": not_http.url, "GHCR_CACHE": "none",  # its /v2/ is not HTTP
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
        assert error["message"].startswith(says) and "BadStatusLine" in error["message"]
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
