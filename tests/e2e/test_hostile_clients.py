"""Clients that misbehave, against the running stack: each gets a clear answer or loses its own
connection, and the proxy keeps serving everyone else with a pull log of valid JSON lines."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.parts import PORT_BASES, TEST_DOMAIN, http_get, raw_exchange

PORT = PORT_BASES["session"]
HUB = f"docker.io.{TEST_DOMAIN}:{PORT}"
CACHE = f"127.0.0.1:{PORT + 1}"
SECRET = "s3cret-token-value"


def request(first_line: str, *headers: str, host: str = HUB) -> bytes:
    return "\r\n".join([first_line, f"Host: {host}", *headers, "Connection: close", "", ""]).encode("latin-1")


@pytest.fixture
def serving(stack):
    """The stack, checked after the test: it still serves a normal pull, and its log is JSON lines."""
    yield stack
    before = len(stack.pull_records())
    status, _, body = http_get(f"http://127.0.0.1:{stack.port}/v2/library/small/tags/list", host=HUB)
    assert (status, json.loads(body)["name"]) == (200, "library/small")
    stack.records_after(before)  # reading the log parses every line of it as JSON
    assert not [line for line in stack.output if "has crashed" in line or "Traceback" in line], "\n".join(stack.output)


@pytest.mark.parametrize("data, answer", [
    (request("GET /v2/ HTTP/1.1", host="\x7f\xff garbage ../../<x>"), b"NAME_UNKNOWN"),
    (request("GET /v2/ HTTP/1.1", host=""), b"NAME_UNKNOWN"),
    (request("GET /v2/ HTTP/1.1", f"Host: ghcr.io.{TEST_DOMAIN}"), b"NAME_UNKNOWN"),  # two Host headers
    (request("GET /v2/" + "a" * 300 + "/manifests/1.0 HTTP/1.1"), b"NAME_INVALID"),
    (request("GET /v2/" + "a" * 20_000 + "/manifests/1.0 HTTP/1.1"), b"longer than 16384"),
    (request("GET /v2/" + "a" * 200_000 + "/manifests/1.0 HTTP/1.1"), b"request head is larger than 65536 bytes"),
    (request("GET /v2/library/small/manifests/1.0%00 HTTP/1.1"), b"MANIFEST_UNKNOWN"),
    (b"HELLO THERE\r\n\r\n", b"400 Bad Request"),
    (bytes(range(1, 256)) + b"\r\n\r\n", b"400 Bad Request"),
    (b"GET /v2/ SPDY/9\r\n\r\n", b"400 Bad Request"),
    (request(f"CONNECT {CACHE} HTTP/1.1", host=CACHE), b"400 Bad Request"),
    (request("GET /v2/ HTTP/1.1", "Content-Length: 5", "Transfer-Encoding: chunked"), b"400 Bad Request"),
], ids=["garbage-host", "empty-host", "two-hosts", "overlong-name", "overlong-path", "overlong-head", "nul-in-tag", "not-http", "binary",
        "unknown-protocol", "connect", "smuggling"])
def test_bad_request_gets_a_clear_answer(serving, data, answer):
    reply = raw_exchange(serving.port, data)
    assert reply.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")) and answer in reply


def test_credentials_in_headers_reach_neither_answer_nor_pull_log(serving):
    before = len(serving.pull_records())
    for host, path in [(f"unmapped.io.{TEST_DOMAIN}:{PORT}", "/v2/library/small/manifests/1.0"),
                       (HUB, "/v2/library/small/manifests/1.0"), (HUB, "/v2/library/small/manifests/bad%20tag")]:
        reply = raw_exchange(serving.port, request(
            f"GET {path} HTTP/1.1", f"Authorization: Bearer {SECRET}", f"X-Registry-Auth: {SECRET}",
            f"Cookie: session={SECRET}", host=host,
        ))
        assert reply.startswith(b"HTTP/1.1 ") and SECRET.encode() not in reply
    serving.pull_records_until(lambda records: len(records) >= before + 3)  # one line per request
    assert SECRET not in serving.pull_log.read_text()


def test_a_client_that_hangs_up_mid_blob_is_logged_and_nobody_else_notices(serving, images):
    layer = images["big"].blob_digests[-1]
    path = f"/v2/{images['big'].name}/blobs/{layer}"
    before = len(serving.pull_records())
    with socket.create_connection(("127.0.0.1", serving.port), timeout=30) as conn:
        conn.sendall(request(f"GET {path} HTTP/1.1", host=f"ghcr.io.{TEST_DOMAIN}:{PORT}"))
        received = 0
        while received < 1 << 20:
            received += len(conn.recv(65536))
    [record] = serving.records_after(before)
    assert (record["registry"], record["reference"]) == ("ghcr.io", layer)
    assert record["status"] == 200 and record["error"]
    assert 0 < record["bytes"] < 100 << 20  # part of a layer of just over 100 MiB
