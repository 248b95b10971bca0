"""End to end: real upstream registry -> registry:2 cache -> regcache proxy -> skopeo.

The stack (tests/e2e/conftest.py) is started by `regcache up`, the same code a user runs. docker.io
is cached (its upstream is the session's local registry); ghcr.io passes through uncached to it.
"""

from __future__ import annotations

import hashlib
import json
import socket

import pytest

from tests.support.parts import MANIFEST_TYPES, PORT_BASES, TEST_DOMAIN, cache_holds, http_get, pull
from regcache_core.dataplane.server import BACKEND as DATAPLANE_BACKEND

PORT = PORT_BASES["session"]
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"


@pytest.mark.parametrize("name", ["small", "big"])
def test_pull_by_virtual_host_matches_upstream_and_fills_cache(stack, images, tmp_path, name):
    image = images[name]
    assert pull(DOCKER_IO, image.reference, tmp_path / "pulled") == image.manifest_digest
    storage = stack.data_dir / "dockerhub" / "storage"
    for digest in image.blob_digests:
        assert cache_holds(storage, digest), f"cache holds no {digest}"
        assert (tmp_path / "pulled/blobs/sha256" / digest.split(":")[1]).is_file()


def test_pull_by_ns_query_as_containerd_sends_it(stack, images):
    """containerd talks to http://<host>:<port> and names the registry in ?ns=; so do we here."""
    image = images["small"]
    base = f"http://127.0.0.1:{PORT}/v2/{image.name}"
    status, headers, body = http_get(f"{base}/manifests/{image.tag}?ns=docker.io", headers={"Accept": MANIFEST_TYPES})
    assert status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == image.manifest_digest
    for digest in image.blob_digests:
        status, _, blob = http_get(f"{base}/blobs/{digest}?ns=docker.io")
        assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == digest


def test_uncached_registry_passes_through_to_upstream(stack, images, tmp_path):
    image = images["small"]
    before = len(stack.pull_records())
    assert pull(f"ghcr.io.{TEST_DOMAIN}:{PORT}", image.reference, tmp_path / "pulled") == image.manifest_digest
    records = stack.records_of_pull(image, before, "ghcr.io")
    assert records and {r["backend"] for r in records} == {stack.settings["GHCR_UPSTREAM"]}


@pytest.mark.parametrize("host, url_suffix, named", [
    (f"unmapped.io.{TEST_DOMAIN}:{PORT}", "", "unmapped.io"),
    (f"127.0.0.1:{PORT}", "?ns=unmapped.io", "unmapped.io"),
    (f"127.0.0.1:{PORT}", "", f"127.0.0.1:{PORT}"),
])
def test_unmapped_registry_gets_404_in_registry_error_format(stack, host, url_suffix, named):
    status, headers, body = http_get(
        f"http://127.0.0.1:{PORT}/v2/library/small/manifests/1.0{url_suffix}", host=host
    )
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)["errors"][0]
    assert error["code"] == "NAME_UNKNOWN" and named in error["message"]


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_writes_get_405(stack, method):
    status, _, body = http_get(
        f"http://127.0.0.1:{PORT}/v2/library/small/blobs/uploads/", host=DOCKER_IO, method=method, data=b"x" * 1000
    )
    assert status == 405
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


@pytest.mark.parametrize("path, status, code", [
    ("/v2/library/small/blobs/sha256:bad", 400, "DIGEST_INVALID"),
    ("/v2/library/small/manifests/sha256:bad", 400, "DIGEST_INVALID"),
    ("/v2/Library/small/manifests/1.0", 400, "NAME_INVALID"),
    ("/v2/library/../etc/manifests/1.0", 400, "NAME_INVALID"),
    ("/v2/_catalog", 404, "UNSUPPORTED"),
    ("/admin", 404, "UNSUPPORTED"),
])
def test_malformed_requests_are_refused_before_any_backend(stack, path, status, code):
    before = len(stack.pull_records())
    got, _, body = http_get(f"http://127.0.0.1:{PORT}{path}", host=DOCKER_IO)
    assert (got, json.loads(body)["errors"][0]["code"]) == (status, code)

    def refused(records: list[dict]) -> list[dict]:
        return [r for r in records[before:] if r["status"] == status]

    assert {r["backend"] for r in refused(stack.pull_records_until(refused))} == {None}


def test_proxy_requests_are_refused(stack):
    """Absolute-form (forward proxy) requests never reach any host: no open proxy."""
    with socket.create_connection(("127.0.0.1", PORT)) as conn:
        cache = stack.settings["DOCKERHUB_CACHE"].removeprefix("http://")
        conn.sendall(f"GET http://{cache}/v2/ HTTP/1.1\r\nHost: {cache}\r\n\r\n".encode())
        assert conn.recv(4096).startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize("name", ["small", "big"])
def test_pull_log_records_every_request(stack, images, tmp_path, name):
    image = images[name]
    before = len(stack.pull_records())
    assert pull(DOCKER_IO, image.reference, tmp_path / "pulled") == image.manifest_digest
    records = [r for r in stack.records_of_pull(image, before, "docker.io") if r["repository"] == image.name]
    manifests = [r for r in records if (r["kind"], r["method"], r["status"]) == ("manifest", "GET", 200)]
    assert {r["reference"] for r in manifests} >= {image.tag}
    blobs = {r["reference"]: r for r in records if (r["kind"], r["method"], r["status"]) == ("blob", "GET", 200)}
    for digest in image.blob_digests:
        assert blobs[digest]["bytes"] == (tmp_path / "pulled/blobs/sha256" / digest.split(":")[1]).stat().st_size
    for record in records:
        assert record["client"] == "127.0.0.1"
        # A manifest regcache holds in memory is answered by regcache itself: no backend; so are
        # a warm small blob, read from the cache's storage, and the 307 that hands a warm big
        # layer to the data plane, which then sends it.
        cache = stack.settings["DOCKERHUB_CACHE"]
        answered_here = record["status"] == 307 or (record["kind"], record["cache"]) == ("manifest", "hit")
        warm_blob = (record["kind"], record["cache"]) == ("blob", "hit")
        assert record["backend"] in ((cache, None) if answered_here else (cache, None, DATAPLANE_BACKEND) if warm_blob
                                     else (cache, DATAPLANE_BACKEND))
        assert record["duration_ms"] >= 0 and record["time"].endswith("+00:00")


def test_upstream_access_log_shows_what_the_cache_fetched(stack, upstream, images, tmp_path):
    """The upstream's access log is how tests count what went upstream: the cached docker.io
    pulls of the small image went there through the egress listener."""
    image = images["small"]
    pull(DOCKER_IO, image.reference, tmp_path / "pulled")
    # Its blobs only: other tests ask this upstream for blobs it does not have in that repository.
    fetched = [line for line in upstream.requests_for(f"/v2/{image.name}/blobs/", "GET")
               if line.path.rsplit("/", 1)[1] in image.blob_digests]
    assert {line.path.rsplit("/", 1)[1] for line in fetched} == set(image.blob_digests)
    assert all(line.status == 200 for line in fetched), [line for line in fetched if line.status != 200]
