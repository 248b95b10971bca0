"""End to end: what nobody has pulled yet, asked for by many at once, through real parts.

A token upstream (fakes.TokenServer, its blobs redirected to a CDN, as Docker Hub does) holds
new images; `regcache up` caches it with credentials. Cold layers go to clients through the
proxy's 307 to its download's spool on the data plane (containerd by a `?ns=` endpoint, Docker
Engine as a registry mirror); a cold blob's HEAD is answered from one upstream HEAD without a
download; concurrent cold pulls of one tag make one upstream request per manifest. What reached
the upstream is read from its access log.
"""

from __future__ import annotations

import time

import pytest

from regcache_core.dataplane.server import BACKEND as DATAPLANE
from tests.e2e.test_clients import docker_pull
from tests.support.clients import Containerd
from tests.support.fakes import Cdn, TokenServer
from tests.support.parts import (
    PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Stack, Upstream, at_once, build_image, build_multiarch_image, cache_holds,
    docker_io_stack, push_index, raw_exchange, raw_request, skopeo, split_responses,
)

PORT = PORT_BASES["test_cold"]
UPSTREAM_PORT = PORT + UPSTREAM_OFFSET
HOST = f"docker.io.{TEST_DOMAIN}:{PORT}"
USER, PASSWORD = "cold-user", "cold-password"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(token upstream, stack caching it with our credentials, CDN)."""
    tmp = tmp_path_factory.mktemp("cold")
    token_server = TokenServer(tmp / "auth", UPSTREAM_PORT + 1, {USER: PASSWORD}).start()
    cdn = Cdn(tmp / "upstream" / "storage", UPSTREAM_PORT + 2).start()
    upstream = Upstream(tmp / "upstream", UPSTREAM_PORT, {"auth": token_server.registry_auth(),
                                                          "middleware": cdn.registry_middleware()},
                        f"{USER}:{PASSWORD}").start()
    stack = docker_io_stack(tmp / "stack", upstream, PORT, {"DOCKERHUB_USERNAME": USER,
                                                            "DOCKERHUB_PASSWORD": PASSWORD}).start()
    yield upstream, stack, cdn, token_server
    stack.stop()
    for part in (upstream, cdn, token_server):
        part.stop()


def new_image(tmp_path, upstream: Upstream, name: str, size: int = 20 << 20):
    """An image nobody has pulled, with a layer of `size` random bytes, pushed to the upstream."""
    image = build_image(tmp_path / "image", name, [("layer.bin", size)])
    upstream.push(image)
    return image


def cdn_gets(cdn: Cdn, digest: str) -> int:
    return sum(method == "GET" and digest.split(":")[1] in path for method, path, _ in cdn.requests)


def storage(stack: Stack):
    return stack.data_dir / "dockerhub/storage"


def test_a_cold_blob_head_is_answered_from_one_upstream_head_and_downloads_nothing(world, tmp_path):
    upstream, stack, cdn, _ = world
    image = new_image(tmp_path, upstream, "library/head-only")
    layer = image.blob_digests[-1]
    size = (upstream.storage / "docker/registry/v2/blobs/sha256" / layer[7:9] / layer[7:] / "data").stat().st_size
    before, heads_before = len(stack.pull_records()), len(upstream.requests_for(layer, "HEAD"))  # skopeo's push HEADs too
    head = raw_request(f"HEAD /v2/{image.name}/blobs/{layer} HTTP/1.1", host=HOST)
    answers = at_once(4, lambda _: split_responses(raw_exchange(PORT, head), ["HEAD"])[0])
    for status, headers, body in answers:
        assert (status, headers["content-length"], headers["docker-content-digest"], body) == (200, str(size), layer, b"")
    assert len(upstream.requests_for(layer, "HEAD")) - heads_before == 1, "one upstream HEAD for the four"
    time.sleep(2)  # what a download would have needed to start
    assert upstream.requests_for(layer, "GET") == [] and cdn_gets(cdn, layer) == 0
    assert not cache_holds(storage(stack), layer, timeout=0), "the blob is still cold"
    records = stack.pull_records_until(lambda rs: len(rs) - before >= 4)[before:]
    assert [(r["method"], r["status"], r["cache"], r["backend"]) for r in records] == [("HEAD", 200, None, None)] * 4

    missing = "sha256:" + "0" * 64
    status, _, _ = split_responses(raw_exchange(PORT, raw_request(f"HEAD /v2/{image.name}/blobs/{missing} HTTP/1.1",
                                                                  host=HOST)), ["HEAD"])[0]
    assert status == 404


def test_concurrent_cold_pulls_of_a_tag_make_one_upstream_request_per_manifest(world, tmp_path):
    upstream, stack, _, token_server = world
    image = build_multiarch_image(tmp_path / "image", "library/rollout", "1.0", ["amd64", "arm64"])
    for platform in image.platforms.values():
        upstream.push(platform)
    push_index(image, upstream.url, authorization=token_server.bearer(USER, f"repository:{image.name}:pull,push"))
    amd64 = image.platforms["amd64"]
    asked_before = len(upstream.access_log())
    results = at_once(8, lambda i: skopeo("copy", "--src-tls-verify=false", f"docker://{HOST}/{image.reference}",
                                          f"oci:{tmp_path / f'pulled-{i}'}", timeout=180))
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results if r.returncode]
    asked = upstream.access_log()[asked_before:]
    for references in ((image.tag, image.index_digest), (amd64.manifest_digest,)):
        requests = [line for line in asked if "/manifests/" in line.path and line.path.rsplit("/", 1)[1] in references]
        heads = [line for line in requests if line.method == "HEAD"]
        gets = [line for line in requests if line.method == "GET"]
        # On failure, also what each client request for a manifest of it got, and how long it took.
        answers = [(r["method"], r["reference"][:19], r["status"], r["cache"], r["duration_ms"])
                   for r in stack.pull_records() if r["repository"] == image.name and r["kind"] == "manifest"]
        assert len(heads) <= 1 and len(gets) <= 1, (references, requests, answers)


@pytest.fixture
def containerd(tmp_path):
    daemon = Containerd(tmp_path / "containerd").start()
    yield daemon
    daemon.stop()


def assert_cold_layer_sent_by_the_data_plane(stack: Stack, upstream: Upstream, cdn: Cdn, image, before: int) -> None:
    layer = image.blob_digests[-1]
    transfers = stack.pull_records_until(lambda rs: [r for r in rs[before:] if r["reference"] == layer
                                                      and r["backend"] == DATAPLANE])
    [transfer] = [r for r in transfers[before:] if r["reference"] == layer and r["backend"] == DATAPLANE]
    assert (transfer["status"], transfer["cache"], transfer["error"]) == (200, "miss", None)
    assert cache_holds(storage(stack), layer, timeout=60)
    assert len(upstream.requests_for(layer, "GET")) == 1 and cdn_gets(cdn, layer) == 1


def test_containerd_pulls_a_cold_layer_through_the_307_to_the_spool(world, containerd, tmp_path):
    upstream, stack, cdn, _ = world
    image = new_image(tmp_path, upstream, "library/cold-containerd")
    certs = stack.client_config(tmp_path / "config", "--endpoint", f"http://127.0.0.1:{PORT}") / "certs.d"
    before = len(stack.pull_records())
    reference = f"docker.io/{image.reference}"
    result = containerd.pull(reference, certs)
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(reference) == image.manifest_digest
    assert containerd.unpacked(reference)  # containerd checks every layer's digest as it unpacks
    assert {r["registry"] for r in stack.pull_records()[before:]} == {"docker.io"}  # by ?ns= alone
    assert_cold_layer_sent_by_the_data_plane(stack, upstream, cdn, image, before)


def test_docker_pulls_a_cold_layer_through_the_307_to_the_spool(world, containerd, tmp_path):
    upstream, stack, cdn, _ = world
    image = new_image(tmp_path, upstream, "library/cold-docker")
    before = docker_pull(stack, {"virtual-hosts": stack.client_config(tmp_path / "config")}, containerd, image, tmp_path)
    assert_cold_layer_sent_by_the_data_plane(stack, upstream, cdn, image, before)
