"""Tags and manifests answered from regcache's memory: no upstream request while a tag is fresh,
one HEAD when it is stale, a moved tag seen once its TTL has passed, multi-arch indexes, and
clients whose Accept does not name what is held going through as before.

A stack and an upstream of the module's own (their access log counts what went upstream), with
a short REGCACHE_TAG_TTL.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from tests.support.parts import (
    MANIFEST_TYPES, OCI_INDEX, PORT_BASES, TEST_DOMAIN, Stack, Upstream, build_image,
    build_multiarch_image, docker_io_stack, http_get, pull, raw_exchange,
)

PORT = PORT_BASES["test_tag_cache"]
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"
TTL = 3.0


@pytest.fixture(scope="module")
def tag_stack(tmp_path_factory, module_upstream) -> Stack:
    stack = docker_io_stack(tmp_path_factory.mktemp("tag-stack"), module_upstream, PORT, {"REGCACHE_TAG_TTL": str(TTL)}).start()
    yield stack
    assert stack.stop() == 0


def image(tmp_path, upstream: Upstream, name: str, tag: str = "1.0", content: bytes | None = None):
    built = build_image(tmp_path, name, [("etc/content", content or name.encode())], tag=tag)
    upstream.push(built)
    return built


def manifest(reference: str, method: str = "GET", accept: str = MANIFEST_TYPES) -> tuple[int, dict, bytes]:
    name, _, tag = reference.rpartition(":")
    return http_get(f"http://127.0.0.1:{PORT}/v2/{name}/manifests/{tag}", host=DOCKER_IO, method=method,
                    headers={"Accept": accept})


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def test_a_fresh_tag_is_answered_without_upstream_requests_and_a_stale_one_with_one_head(
        tag_stack, module_upstream, tmp_path):
    small = image(tmp_path, module_upstream, "library/fresh")
    assert pull(DOCKER_IO, small.reference, tmp_path / "pulled") == small.manifest_digest
    seen = len(module_upstream.access_log())
    for method in ("GET", "HEAD") * 25:
        status, headers, body = manifest(small.reference, method)
        assert status == 200 and headers["Docker-Content-Digest"] == small.manifest_digest
        assert headers["Content-Type"] == small.manifest_type
        assert int(headers["Content-Length"]) == small.manifest_size
        assert body == b"" if method == "HEAD" else digest_of(body) == small.manifest_digest
    assert module_upstream.access_log()[seen:] == []
    time.sleep(TTL + 0.5)
    status, headers, _ = manifest(small.reference)
    assert status == 200 and headers["Docker-Content-Digest"] == small.manifest_digest
    asked = module_upstream.access_log()[seen:]
    assert [(line.method, line.path) for line in asked] == [("HEAD", f"/v2/{small.name}/manifests/{small.tag}")]
    records = tag_stack.records_after(len(tag_stack.pull_records()) - 1)
    assert (records[-1]["cache"], records[-1]["reference"]) == ("hit", small.tag)


def test_a_moved_tag_is_seen_after_its_ttl_not_before(tag_stack, module_upstream, tmp_path):
    first = image(tmp_path / "a", module_upstream, "library/moving", content=b"first")
    assert digest_of(manifest(first.reference)[2]) == first.manifest_digest
    second = image(tmp_path / "b", module_upstream, "library/moving", content=b"second")
    assert second.manifest_digest != first.manifest_digest
    assert digest_of(manifest(first.reference)[2]) == first.manifest_digest  # still fresh
    time.sleep(TTL + 0.5)
    status, headers, body = manifest(first.reference)
    assert (status, digest_of(body), headers["Docker-Content-Digest"]) == (200, second.manifest_digest, second.manifest_digest)
    assert digest_of(manifest(first.reference)[2]) == second.manifest_digest  # and learnt


def test_a_head_from_memory_has_no_body_and_the_headers_of_a_get(tag_stack, module_upstream, tmp_path):
    small = image(tmp_path, module_upstream, "library/head")
    get_status, get_headers, _ = manifest(small.reference)
    assert get_status == 200
    seen = len(module_upstream.access_log())
    answer = raw_exchange(PORT, (f"HEAD /v2/{small.name}/manifests/{small.tag} HTTP/1.1\r\nHost: {DOCKER_IO}\r\n"
                                 f"Accept: {MANIFEST_TYPES}\r\nConnection: close\r\n\r\n").encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""
    fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    fields = {name.lower(): value for name, value in fields.items()}
    for name in ("Content-Type", "Docker-Content-Digest", "Content-Length", "Etag"):
        assert fields[name.lower()] == get_headers[name], name
    assert module_upstream.access_log()[seen:] == []


def test_a_multiarch_index_by_tag_and_a_client_that_does_not_accept_it(tag_stack, module_upstream, tmp_path):
    multi = build_multiarch_image(tmp_path, "library/multi", "1.0", ["amd64", "arm64"])
    module_upstream.push_multiarch(multi)
    everything = f"{OCI_INDEX}, {MANIFEST_TYPES}"
    status, headers, body = manifest(multi.reference, accept=everything)
    assert (status, digest_of(body), headers["Content-Type"]) == (200, multi.index_digest, OCI_INDEX)
    seen, before = len(module_upstream.access_log()), len(tag_stack.pull_records())
    status, _, body = manifest(multi.reference, accept=everything)
    assert (status, digest_of(body)) == (200, multi.index_digest)
    assert module_upstream.access_log()[seen:] == []
    assert tag_stack.records_after(before)[0]["backend"] is None  # answered from memory
    # Without the index type in Accept, the request goes to the cache as it came, and gets what
    # the cache gives such a client.
    before = len(tag_stack.pull_records())
    status, headers, body = manifest(multi.reference, accept=MANIFEST_TYPES)
    direct = http_get(f"{tag_stack.settings['DOCKERHUB_CACHE']}/v2/{multi.name}/manifests/{multi.tag}",
                      headers={"Accept": MANIFEST_TYPES})
    assert (status, body) == direct[0::2]
    assert tag_stack.records_after(before)[0]["backend"] == tag_stack.settings["DOCKERHUB_CACHE"]
