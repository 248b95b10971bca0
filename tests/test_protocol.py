"""The registry protocol spoken exactly, through the running stack, with raw sockets where a
client library would hide the difference: what regcache answers itself, and what it fixes in
registry:2's answers."""

from __future__ import annotations

import json

import pytest

from parts import PORT_BASES, TEST_DOMAIN, raw_exchange

PORT = PORT_BASES["session"]
HUB = f"docker.io.{TEST_DOMAIN}:{PORT}"
EGRESS = PORT + 80  # docker.io's egress listener: the cache's upstream
MISSING = "sha256:" + "ab" * 32


def request(first_line: str, *headers: str, host: str = HUB, close: bool = True) -> bytes:
    lines = [first_line, f"Host: {host}", *headers, *(["Connection: close"] if close else []), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def responses(reply: bytes, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """Split what came back on one connection into (status, headers, body) per request, the way
    a client does: a HEAD's answer has no body, any other's is Content-Length bytes long."""
    answers = []
    for method in methods:
        head, separator, reply = reply.partition(b"\r\n\r\n")
        assert separator, f"no complete answer for {method}: {head[:200]!r}"
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), f"not an answer: {status_line[:200]!r}"
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
        length = 0 if method == "HEAD" else int(headers.get("content-length", "0"))
        answers.append((int(status_line.split()[1]), headers, reply[:length]))
        reply = reply[length:]
    assert reply == b"", f"bytes after the last answer: {reply[:200]!r}"
    return answers


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


@pytest.mark.parametrize("port, path, host, status", [
    (PORT, "/v2/", f"unmapped.io.{TEST_DOMAIN}:{PORT}", 404),
    (PORT, "/v2/Library/small/manifests/1.0", HUB, 400),
    (PORT, "/v2/library/small/uploads/", HUB, 404),
    (EGRESS, "/v2/", f"127.0.0.1:{EGRESS}", 200),  # the cache's ping, answered by the egress listener
], ids=["unmapped-host", "bad-name", "not-a-pull-path", "egress-ping"])
def test_a_head_answered_by_regcache_has_no_body_so_the_next_request_on_the_connection_works(stack, port, path, host, status):
    reply = raw_exchange(port, request(f"HEAD {path} HTTP/1.1", host=host, close=False)
                         + request(f"GET {path} HTTP/1.1", host=host))
    (head_status, head_headers, _), (get_status, get_headers, get_body) = responses(reply, ["HEAD", "GET"])
    assert head_status == get_status == status
    assert head_headers["content-length"] == get_headers["content-length"] == str(len(get_body))


def test_an_impossible_tag_is_404_manifest_unknown_and_a_malformed_digest_still_400(stack):
    for method in ("GET", "HEAD"):
        [(status, _, body)] = responses(raw_exchange(PORT, request(
            f"{method} /v2/library/small/manifests/.INVALID_NAME HTTP/1.1")), [method])
        assert status == 404 and (method == "HEAD" or error_code(body) == "MANIFEST_UNKNOWN")
    [(status, _, body)] = responses(raw_exchange(PORT, request("GET /v2/library/small/manifests/sha256:bad HTTP/1.1")), ["GET"])
    assert (status, error_code(body)) == (400, "DIGEST_INVALID")


def test_a_missing_manifest_by_digest_is_404_manifest_unknown_not_the_caches_500(stack, upstream):
    reply = raw_exchange(PORT, request(f"HEAD /v2/library/small/manifests/{MISSING} HTTP/1.1", close=False)
                         + request(f"GET /v2/library/small/manifests/{MISSING} HTTP/1.1"))
    (head_status, _, _), (get_status, _, body) = responses(reply, ["HEAD", "GET"])
    assert (head_status, get_status, error_code(body)) == (404, 404, "MANIFEST_UNKNOWN")
    assert upstream.requests_for(MISSING)  # the cache did ask its upstream: it was a real miss
