"""The registry protocol spoken exactly, through the running stack, with raw sockets where a
client library would hide the difference: what regcache answers itself, and what it fixes in
registry:2's answers."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.parts import PORT_BASES, TEST_DOMAIN, http_get, raw_exchange, raw_request, split_responses, skopeo

PORT = PORT_BASES["session"]
HUB = f"docker.io.{TEST_DOMAIN}:{PORT}"
EGRESS = PORT + 80  # docker.io's egress listener: the cache's upstream
MISSING = "sha256:" + "ab" * 32


def request(first_line: str, *headers: str, host: str = HUB, close: bool = True) -> bytes:
    return raw_request(first_line, *headers, host=host, close=close)


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


@pytest.mark.parametrize("port, path, host, status", [
    (PORT, "/v2/", f"unmapped.io.{TEST_DOMAIN}:{PORT}", 404),
    (PORT, "/v2/Library/small/manifests/1.0", HUB, 400),
    (PORT, "/v2/library/small/uploads/", HUB, 404),
    (EGRESS, "/v2/", f"127.0.0.1:{EGRESS}", 401),  # the cache's ping, answered by the egress listener
], ids=["unmapped-host", "bad-name", "not-a-pull-path", "egress-ping"])
def test_a_head_answered_by_regcache_has_no_body_so_the_next_request_on_the_connection_works(stack, port, path, host, status):
    reply = raw_exchange(port, request(f"HEAD {path} HTTP/1.1", host=host, close=False)
                         + request(f"GET {path} HTTP/1.1", host=host))
    (head_status, head_headers, _), (get_status, get_headers, get_body) = split_responses(reply, ["HEAD", "GET"])
    assert head_status == get_status == status
    assert head_headers["content-length"] == get_headers["content-length"] == str(len(get_body))


def test_an_impossible_tag_is_404_manifest_unknown_and_a_malformed_digest_still_400(stack):
    for method in ("GET", "HEAD"):
        [(status, _, body)] = split_responses(raw_exchange(PORT, request(
            f"{method} /v2/library/small/manifests/.INVALID_NAME HTTP/1.1")), [method])
        assert status == 404 and (method == "HEAD" or error_code(body) == "MANIFEST_UNKNOWN")
    [(status, _, body)] = split_responses(raw_exchange(PORT, request("GET /v2/library/small/manifests/sha256:bad HTTP/1.1")), ["GET"])
    assert (status, error_code(body)) == (400, "DIGEST_INVALID")


def test_a_missing_manifest_by_digest_is_404_manifest_unknown_not_the_caches_500(stack, upstream):
    reply = raw_exchange(PORT, request(f"HEAD /v2/library/small/manifests/{MISSING} HTTP/1.1", close=False)
                         + request(f"GET /v2/library/small/manifests/{MISSING} HTTP/1.1"))
    (head_status, _, _), (get_status, _, body) = split_responses(reply, ["HEAD", "GET"])
    assert (head_status, get_status, error_code(body)) == (404, 404, "MANIFEST_UNKNOWN")
    assert upstream.requests_for(MISSING)  # the cache did ask its upstream: it was a real miss


def test_an_answer_to_a_request_routed_by_ns_names_its_registry_in_oci_namespace_and_one_by_host_does_not(stack, images):
    blob = images["small"].blob_digests[0]
    for path in ("/v2/", "/v2/library/small/manifests/1.0", f"/v2/library/small/manifests/{MISSING}",
                 f"/v2/library/small/blobs/{blob}"):  # regcache's own, the cache's, a replaced 500, a 307 or a blob
        for method in ("GET", "HEAD"):
            by_ns = raw_exchange(PORT, request(f"{method} {path}?ns=docker.io HTTP/1.1", host=f"127.0.0.1:{PORT}"))
            by_host = raw_exchange(PORT, request(f"{method} {path}?ns=docker.io HTTP/1.1"))
            [(status, headers, _)] = split_responses(by_ns, [method])
            assert headers.get("oci-namespace") == "docker.io", (method, path, status)
            [(status, headers, _)] = split_responses(by_host, [method])
            assert "oci-namespace" not in headers, (method, path, status)


def test_only_canonical_get_and_head_leave_the_proxy(stack, upstream):
    for method in ("get", "hEaD", "Get"):
        path = f"/v2/library/small/manifests/1.0?case={method}"
        [(status, _, body)] = split_responses(raw_exchange(PORT, request(f"{method} {path} HTTP/1.1")), [method.upper()])
        assert status == 405 and (method.upper() == "HEAD" or error_code(body) == "UNSUPPORTED")
        egress_path = f"/v2/library/small/manifests/1.0?egress={method}"
        [(status, _, _)] = split_responses(raw_exchange(EGRESS, request(f"{method} {egress_path} HTTP/1.1", host=f"127.0.0.1:{EGRESS}")),
                                     [method.upper()])
        assert status == 405
    assert not [line for line in upstream.access_log() + stack.cache_access_log() if "case=" in line.path or "egress=" in line.path]


@pytest.mark.parametrize("data", [
    b"GET /v2/ HTTP/0.9\r\nHost: " + HUB.encode() + b"\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\nHost: " + HUB.encode() + b"\r\n\r\n",
    request("GET /v2/ HTTP/1.1", "Transfer-Encoding: chunked", "Trailer: X-Checksum", close=False)
    + b"5\r\nhello\r\n0\r\nX-Checksum: 1234\r\n\r\n" + request("GET /v2/ HTTP/1.1"),
    request("GET /v2/ HTTP/1.1", "Content-Length: 5", close=False) + b"hello" + request("GET /v2/ HTTP/1.1"),
    # mitmproxy calls this an HTTP/2 request (found by test_properties): it hung, unanswered.
    b"GET /v2/ HTTP/2.0\r\nHost: " + HUB.encode() + b"\r\nContent-Length: 3\r\n\r\n",
], ids=["http-0.9", "http-9.9", "chunked-with-trailers", "get-with-body", "http-2.0-request-line-with-a-body"])
def test_a_bad_protocol_or_a_pull_with_a_body_is_400_and_the_connection_closes(stack, data):
    reply = raw_exchange(PORT, data, timeout=5)
    [(status, headers, body)] = split_responses(reply, ["GET"])  # one answer: nothing after it was read
    assert (status, headers["connection"], error_code(body)) == (400, "close", "UNSUPPORTED")
    assert not [line for line in stack.output if "has crashed" in line or "Traceback" in line]


@pytest.mark.parametrize("path", [
    "/v2/library/small/tags/list?n=\xff",
    "/v2/library/small/manifests/1.0\xff",
    "/_regcache/redirect?url=x&sig=\xff",
])
def test_raw_bytes_that_are_not_ascii_are_400_without_a_traceback(stack, path):
    [(status, _, body)] = split_responses(raw_exchange(PORT, request(f"GET {path} HTTP/1.1")), ["GET"])
    assert (status, error_code(body)) == (400, "UNSUPPORTED")
    assert not [line for line in stack.output if "Traceback" in line or "could not route" in line]


def test_a_huge_query_is_431_a_long_one_414_and_too_many_fields_400_before_any_parsing(stack):
    huge = "&".join(["a=1"] * 2_000_000)  # 7.6 MiB, as in the issue: past the request-head bound
    long = "&".join(["a=1"] * 5_000)  # 20 KiB: within the head bound, past the target's
    [(huge_status, _, _)] = split_responses(raw_exchange(PORT, request(f"GET /v2/?{huge} HTTP/1.1")), ["GET"])
    [(long_status, _, _)] = split_responses(raw_exchange(PORT, request(f"GET /v2/?{long} HTTP/1.1")), ["GET"])
    [(many_status, _, body)] = split_responses(raw_exchange(PORT, request(f"GET /v2/?{'&'.join(['a=1'] * 100)} HTTP/1.1")), ["GET"])
    assert (huge_status, long_status, many_status, error_code(body)) == (431, 414, 400, "UNSUPPORTED")


@pytest.mark.parametrize("head, body", [
    (request("PUT /v2/library/small/manifests/2.0 HTTP/1.1", "Content-Length: 4"), b"{}{}"),
    (request("PATCH /v2/library/small/blobs/uploads/x HTTP/1.1", "Transfer-Encoding: chunked"),
     b"10000\r\n" + b"x" * 0x10000 + b"\r\n"),  # the body goes on: the client waits for our answer first
    (request("PUT /v2/library/small/blobs/uploads/x HTTP/1.1", f"Content-Length: {50 << 20}"), b"x" * (1 << 20)),
], ids=["small-put", "chunked-patch", "large-put"])
def test_a_push_is_405_unsupported_at_once_and_the_connection_closes(stack, upstream, head, body):
    """The answer comes while the client still holds most of its body: regcache neither waits
    for nor buffers it."""
    before = len(upstream.access_log())
    [(status, headers, answer)] = split_responses(raw_exchange(PORT, head + body), ["PUT"])
    assert (status, error_code(answer), headers["connection"], headers["allow"]) == (405, "UNSUPPORTED", "close", "GET, HEAD")
    assert len(upstream.access_log()) == before
    assert not [line for line in stack.output if "has crashed" in line or "Traceback" in line]


PAGED_TAGS = ["1.0", "1.1", "2.0", "Beta", "latest"]  # lexical order: digits, upper case, lower case


@pytest.fixture(scope="module")
def paged_repository(upstream, images):
    """library/paged on the session upstream, one image under five tags."""
    for tag in PAGED_TAGS:
        result = skopeo("copy", "--dest-tls-verify=false", f"oci:{images['small'].layout}:1.0",
                        f"docker://127.0.0.1:{upstream.port}/library/paged:{tag}")
        assert result.returncode == 0, result.stderr
    return "library/paged"


def tags_list(path: str, host: str = HUB) -> tuple[list[str], str | None]:
    status, headers, body = http_get(f"http://127.0.0.1:{PORT}{path}", host=host)
    assert status == 200, body
    return json.loads(body)["tags"], headers.get("Link")


def test_tags_list_pages_with_n_last_and_link_over_what_the_cache_answers(stack, paged_repository):
    base = f"/v2/{paged_repository}/tags/list"
    assert tags_list(base)[0] == PAGED_TAGS
    pages, path = [], f"{base}?n=2"
    while path:
        tags, link = tags_list(path)
        pages.append(tags)
        path = link and re.fullmatch(r'<(.+)>; rel="next"', link)[1]
    assert pages == [["1.0", "1.1"], ["2.0", "Beta"], ["latest"]]
    assert tags_list(f"{base}?n=0") == ([], None)
    assert tags_list(f"{base}?last=2.0") == (["Beta", "latest"], None)
    assert tags_list(f"{base}?n=10&last=Beta") == (["latest"], None)
    # containerd's ?ns= stays in the Link, so the next page reaches the same registry
    assert tags_list(f"{base}?ns=docker.io&n=4", host=f"127.0.0.1:{PORT}") == (
        PAGED_TAGS[:4], f'<{base}?ns=docker.io&n=4&last=Beta>; rel="next"')
    status, _, body = http_get(f"http://127.0.0.1:{PORT}{base}?n=many", host=HUB)
    assert (status, error_code(body)) == (400, "PAGINATION_NUMBER_INVALID")
