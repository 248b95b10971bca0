"""End to end: real upstream registry -> registry:2 cache -> regcache proxy -> skopeo.

The stack is started by `regcache up`, the same code a user runs. docker.io is cached (its
upstream is the session's local registry); ghcr.io passes through uncached to the same one.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time

import pytest

from parts import TEST_DOMAIN, Stack, Upstream, http_get, push_image, skopeo

PORT = 5000
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, upstream) -> Stack:
    stack = Stack(tmp_path_factory.mktemp("stack"), {
        "REGCACHE_REGISTRIES": "DOCKERHUB,GHCR",
        "DOCKERHUB_UPSTREAM": upstream.url,
        "DOCKERHUB_CACHE": "http://127.0.0.1:5001",
        "GHCR_UPSTREAM": upstream.url,
        "GHCR_CACHE": "none",
    }).start()
    yield stack
    assert stack.stop() == 0, "regcache up should exit 0 on SIGTERM"


def pull(registry_host: str, image, destination) -> str:
    """skopeo copy through the proxy into an OCI layout; returns the pulled manifest's digest."""
    result = skopeo("copy", "--src-tls-verify=false", f"docker://{registry_host}/{image.reference}",
                    f"oci:{destination}:{image.tag}")
    assert result.returncode == 0, result.stderr
    index = json.loads((destination / "index.json").read_text())
    return index["manifests"][0]["digest"]


def cache_holds(storage, digest: str, timeout: float = 15) -> bool:
    """registry:2 commits a proxied blob to its storage just after it finished serving it."""
    hex_digest = digest.split(":")[1]
    path = storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"
    deadline = time.monotonic() + timeout
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    return path.is_file()


@pytest.mark.parametrize("name", ["small", "big"])
def test_pull_by_virtual_host_matches_upstream_and_fills_cache(stack, images, tmp_path, name):
    image = images[name]
    assert pull(DOCKER_IO, image, tmp_path / "pulled") == image.manifest_digest
    storage = stack.data_dir / "dockerhub" / "storage"
    for digest in image.blob_digests:
        assert cache_holds(storage, digest), f"cache holds no {digest}"
        assert (tmp_path / "pulled/blobs/sha256" / digest.split(":")[1]).is_file()


def test_pull_by_ns_query_as_containerd_sends_it(stack, images):
    """containerd talks to http://<host>:5000 and names the registry in ?ns=; so do we here."""
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
    assert pull(f"ghcr.io.{TEST_DOMAIN}:{PORT}", image, tmp_path / "pulled") == image.manifest_digest
    records = [r for r in stack.pull_records() if r["registry"] == "ghcr.io"]
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
    assert stack.pull_records()[before]["backend"] is None


def test_proxy_requests_are_refused(stack):
    """Absolute-form (forward proxy) requests never reach any host: no open proxy."""
    with socket.create_connection(("127.0.0.1", PORT)) as conn:
        conn.sendall(b"GET http://127.0.0.1:5001/v2/ HTTP/1.1\r\nHost: 127.0.0.1:5001\r\n\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 400")


def test_pull_log_records_every_request(stack, images):
    image = images["small"]
    records = [r for r in stack.pull_records() if r["registry"] == "docker.io" and r["repository"] == image.name]
    manifests = [r for r in records if r["kind"] == "manifest" and r["method"] == "GET" and r["status"] == 200]
    assert {r["reference"] for r in manifests} >= {image.tag}
    blobs = {r["reference"]: r for r in records if r["kind"] == "blob" and r["status"] == 200}
    assert set(image.blob_digests) <= set(blobs)
    layer = image.blob_digests[-1]
    assert blobs[layer]["bytes"] == len(http_get(
        f"http://127.0.0.1:{PORT}/v2/{image.name}/blobs/{layer}", host=DOCKER_IO)[2])
    for record in records:
        assert record["client"] == "127.0.0.1"
        assert record["backend"] == "http://127.0.0.1:5001"
        assert record["duration_ms"] >= 0 and record["time"].endswith("+00:00")
    big_layer = images["big"].blob_digests[-1]
    big = [r for r in stack.pull_records() if r["reference"] == big_layer and r["method"] == "GET"]
    assert big and big[0]["bytes"] > 100 << 20


def test_cached_image_is_served_with_upstream_stopped(tmp_path, images):
    """A fresh upstream and stack, so stopping the upstream disturbs no other test."""
    upstream = Upstream(tmp_path / "upstream", 6001).start()
    image = images["small"]
    push_image(image, f"127.0.0.1:{upstream.port}")
    stack = Stack(tmp_path / "stack", {
        "REGCACHE_PORT": "5100",
        "REGCACHE_ADMIN_PORT": "5180",  # the module's stack holds 5080
        "REGCACHE_REGISTRIES": "DOCKERHUB",
        "DOCKERHUB_UPSTREAM": upstream.url,
        "DOCKERHUB_CACHE": "http://127.0.0.1:5101",
    }).start()
    try:
        host = f"docker.io.{TEST_DOMAIN}:5100"
        assert pull(host, image, tmp_path / "first") == image.manifest_digest
        upstream.stop()
        assert pull(host, image, tmp_path / "second") == image.manifest_digest
        by_digest = f"{host}/{image.name}@{image.manifest_digest}"
        assert skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{by_digest}").returncode == 0
        never_pulled = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{host}/library/never:1.0")
        assert never_pulled.returncode != 0
    finally:
        stack.stop()
        upstream.stop()
