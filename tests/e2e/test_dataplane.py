"""The data plane: warm blobs answered by the proxy with a 307 to it, then sent from the cache's
storage by sendfile; only what a signed grant names, with registry:2's headers, Range and
conditional requests; each transfer in the pull log and the metrics.

One stack for the module (docker.io cached from the session's upstream); the big image's
100 MiB layer is over REGCACHE_DATAPLANE_MIN_SIZE (default 256k), the small image's are under it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.parts import (
    PORT_BASES, TEST_DOMAIN, Stack, accepts_connections, cache_holds, docker_io_stack, http_get, poll, pull, raw_exchange,
)
from regcache_core.dataplane.grants import Grant, GrantSigner, load_or_create_key
from regcache_core.dataplane.server import BACKEND

PORT = PORT_BASES["test_dataplane"]
DATAPLANE_PORT = PORT + 50
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"


@pytest.fixture(scope="module")
def dp_stack(tmp_path_factory, upstream) -> Stack:
    stack = docker_io_stack(tmp_path_factory.mktemp("dataplane-stack"), upstream, PORT).start()
    yield stack
    assert stack.stop() == 0
    # Refused and cut exchanges are answered or recorded, never logged with a traceback.
    assert not [line for line in stack.output if "regcache data plane" in line or "regcache_core/dataplane" in line], \
        "\n".join(stack.output)


@pytest.fixture(scope="module")
def warm(dp_stack, images, tmp_path_factory) -> dict:
    """Both images pulled once (cold: streamed through the proxy), so the cache holds them."""
    for image in images.values():
        assert pull(DOCKER_IO, image.reference, tmp_path_factory.mktemp("cold")) == image.manifest_digest
        for digest in image.blob_digests:
            assert cache_holds(dp_stack.data_dir / "dockerhub/storage", digest)
    big = images["big"]
    layer = big.blob_digests[-1]
    return {"image": big, "layer": layer, "size": blob_file(dp_stack, layer).stat().st_size}


def blob_file(stack: Stack, digest: str) -> Path:
    hex_digits = digest.split(":")[1]
    return stack.data_dir / "dockerhub/storage/docker/registry/v2/blobs/sha256" / hex_digits[:2] / hex_digits / "data"


def signer(stack: Stack, clock=time.time) -> GrantSigner:
    """Signs as the proxy does, with the key in the data dir (which only its owner can read)."""
    return GrantSigner(load_or_create_key(stack.data_dir), clock)


def dataplane_url(stack: Stack, grant: Grant) -> str:
    return f"http://127.0.0.1:{DATAPLANE_PORT}/_regcache/blob?{signer(stack).query(grant)}"


def handoff(image_name: str, digest: str, host: str = DOCKER_IO, query: str = "") -> tuple[int, dict]:
    """The proxy's answer to a blob GET, without following it."""
    request = f"GET /v2/{image_name}/blobs/{digest}{query} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    head = raw_exchange(PORT, request.encode()).split(b"\r\n\r\n")[0].decode().split("\r\n")
    status = int(head[0].split()[1])
    return status, {name.lower(): value for name, _, value in (line.partition(": ") for line in head[1:])}


def test_a_warm_big_layer_is_sent_by_the_data_plane(dp_stack, warm, tmp_path):
    image = warm["image"]
    before, cache_before = len(dp_stack.pull_records()), len(dp_stack.cache_access_log())
    assert pull(DOCKER_IO, image.reference, tmp_path / "pulled") == image.manifest_digest
    pulled = tmp_path / "pulled/blobs/sha256" / warm["layer"].split(":")[1]
    assert "sha256:" + hashlib.sha256(pulled.read_bytes()).hexdigest() == warm["layer"]

    def layer_records(records):
        return [r for r in records[before:] if r["reference"] == warm["layer"]]

    records = layer_records(dp_stack.pull_records_until(lambda rs: any(r["backend"] == BACKEND for r in layer_records(rs))))
    handed_off = [r for r in records if r["backend"] is None]
    sent = [r for r in records if r["backend"] == BACKEND]
    assert [(r["method"], r["status"], r["bytes"], r["cache"]) for r in handed_off] == [("GET", 307, 0, "hit")]
    assert [(r["method"], r["status"], r["bytes"], r["cache"]) for r in sent] == [("GET", 200, warm["size"], "hit")]
    assert sent[0]["registry"] == "docker.io" and sent[0]["repository"] == image.name and sent[0]["client"] == "127.0.0.1"
    # The small blobs (the config) are answered by the proxy from the cache's storage: the cache
    # is not asked for them.
    small = [r for r in dp_stack.pull_records()[before:] if r["kind"] == "blob" and r["reference"] != warm["layer"]]
    assert small and {(r["status"], r["backend"], r["cache"]) for r in small} == {(200, None, "hit")}
    asked = [line.path for line in dp_stack.cache_access_log()[cache_before:] if "/blobs/" in line.path]
    assert not [path for path in asked if any(r["reference"] in path for r in small)], asked


def test_data_plane_transfers_count_in_the_metrics(dp_stack, warm):
    def sent(metrics):
        return metrics.get(("regcache_response_bytes_total", (("cache", "hit"), ("kind", "blob"), ("registry", "docker.io"),
                                                             ("status", "200"))), 0)

    before = sent(dp_stack.metrics())
    status, headers = handoff(warm["image"].name, warm["layer"])
    assert status == 307
    assert http_get(headers["location"])[0] == 200
    assert poll(lambda: sent(dp_stack.metrics()), lambda value: value >= before + warm["size"]) == before + warm["size"]


@pytest.mark.parametrize("host, query, location_host", [
    (DOCKER_IO, "", f"docker.io.{TEST_DOMAIN}"),
    (f"DOCKER.io.{TEST_DOMAIN}:{PORT}", "", f"DOCKER.io.{TEST_DOMAIN}"),  # as the client spelled it
    (f"127.0.0.1:{PORT}", "?ns=docker.io", "127.0.0.1"),  # containerd's one endpoint
    (f"[::1]:{PORT}", "?ns=docker.io", "[::1]"),
])
def test_the_307_leads_to_the_data_plane_on_the_host_the_client_used(dp_stack, warm, host, query, location_host):
    status, headers = handoff(warm["image"].name, warm["layer"], host, query)
    assert status == 307
    assert headers["docker-content-digest"] == warm["layer"]
    location = urlsplit(headers["location"])
    assert (location.scheme, location.netloc, location.path) == ("http", f"{location_host}:{DATAPLANE_PORT}", "/_regcache/blob")


def test_head_and_small_blobs_stay_on_the_proxy(dp_stack, warm, images):
    status, headers, body = http_get(f"http://127.0.0.1:{PORT}/v2/{warm['image'].name}/blobs/{warm['layer']}",
                                     host=DOCKER_IO, method="HEAD")
    assert (status, int(headers["Content-Length"]), body) == (200, warm["size"], b"")
    small = images["small"]
    cache = dp_stack.settings["DOCKERHUB_CACHE"]
    for digest in small.blob_digests:
        status, headers, body = http_get(f"http://127.0.0.1:{PORT}/v2/{small.name}/blobs/{digest}", host=DOCKER_IO)
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
        # The cache's own answer, header for header (the proxy answered this one itself).
        _, from_cache, _ = http_get(f"{cache}/v2/{small.name}/blobs/{digest}")
        shown = ("content-length", "content-type", "docker-content-digest", "etag", "accept-ranges", "cache-control")
        assert lowered(headers, shown) == lowered(from_cache, shown)
    # A Range of a small blob goes to the cache, which answers it.
    digest = small.blob_digests[-1]
    status, headers, body = http_get(f"http://127.0.0.1:{PORT}/v2/{small.name}/blobs/{digest}", host=DOCKER_IO,
                                     headers={"Range": "bytes=0-9"})
    assert (status, len(body), headers["Content-Range"].split("/")[0]) == (206, 10, "bytes 0-9")


def lowered(headers: dict, names: tuple[str, ...]) -> dict:
    """The headers named (in lower case), whatever case their sender wrote them in."""
    by_name = {name.lower(): value for name, value in headers.items()}
    return {name: by_name.get(name) for name in names}


def test_the_data_plane_answers_with_registry_headers(dp_stack, warm):
    status, headers, body = http_get(dataplane_url(dp_stack, grant_for(warm)))
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == warm["layer"]
    assert headers["Content-Length"] == str(warm["size"])
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Docker-Content-Digest"] == warm["layer"]
    assert headers["ETag"] == f'"{warm["layer"]}"'
    assert headers["Accept-Ranges"] == "bytes"


def grant_for(warm: dict, **changes) -> Grant:
    fields = {"kind": "blob", "registry": "docker.io", "repository": warm["image"].name, "digest": warm["layer"],
              "size": warm["size"], "expires": int(time.time()) + 60, **changes}
    return Grant(**fields)


@pytest.mark.parametrize("range_header, status, part", [
    ("bytes=100-199", 206, slice(100, 200)),
    ("bytes=-10", 206, slice(-10, None)),
    ("bytes=5000-", 206, slice(5000, None)),
    ("bytes=0-0", 206, slice(0, 1)),
])
def test_range_requests_get_the_right_bytes(dp_stack, warm, range_header, status, part):
    got_status, headers, body = http_get(dataplane_url(dp_stack, grant_for(warm)), headers={"Range": range_header})
    with open(blob_file(dp_stack, warm["layer"]), "rb") as f:
        expected = f.read()[part]
    assert (got_status, body) == (status, expected)
    start = part.start if part.start >= 0 else warm["size"] + part.start
    assert headers["Content-Range"] == f"bytes {start}-{start + len(expected) - 1}/{warm['size']}"


def test_a_range_past_the_end_gets_416(dp_stack, warm):
    status, headers, _ = http_get(dataplane_url(dp_stack, grant_for(warm)), headers={"Range": f"bytes={warm['size']}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{warm['size']}"


def test_conditional_requests(dp_stack, warm):
    url = dataplane_url(dp_stack, grant_for(warm))
    etag = f'"{warm["layer"]}"'
    assert http_get(url, headers={"If-None-Match": etag})[0] == 304
    assert http_get(url, headers={"If-Match": '"sha256:other"'})[0] == 412
    _, headers, _ = http_get(url, method="HEAD")
    assert http_get(url, method="HEAD", headers={"If-Modified-Since": headers["Last-Modified"]})[0] == 304
    # If-Range with another ETag: the whole blob, not the range.
    status, _, body = http_get(url, headers={"Range": "bytes=0-9", "If-Range": '"sha256:other"'})
    assert status == 200 and len(body) == warm["size"]


def test_head_on_the_data_plane_has_no_body(dp_stack, warm):
    path = urlsplit(dataplane_url(dp_stack, grant_for(warm)))
    answer = raw_exchange(DATAPLANE_PORT, f"HEAD {path.path}?{path.query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {warm['size']}".encode() in head
    assert body == b""


def denied(url: str) -> dict:
    status, headers, body = http_get(url)
    assert status == 403 and headers["Content-Type"].startswith("application/json")
    return json.loads(body)["errors"][0]


def test_unsigned_altered_expired_and_other_kind_urls_get_403(dp_stack, warm, images):
    good = dataplane_url(dp_stack, grant_for(warm))
    base = good.partition("?")[0]
    other = images["big"].blob_digests[0]  # the image's config: another blob of the same repository
    urls = {
        "unsigned": base,
        "no signature": good.rpartition("&sig=")[0],
        "other blob": good.replace(warm["layer"].split(":")[1], other.split(":")[1]),
        "other repository": good.replace("library%2Fbig", "library%2Fsmall"),
        "longer expiry": good.replace(f"exp={grant_for(warm).expires}", f"exp={grant_for(warm).expires + 3600}"),
        "expired": f"{base}?{signer(dp_stack, clock=lambda: time.time() - 3600).query(grant_for(warm, expires=int(time.time()) - 1))}",
        "other kind": f"{base}?{signer(dp_stack).query(grant_for(warm, kind='spool'))}",
        "other key": f"{base}?{GrantSigner(os.urandom(32)).query(grant_for(warm))}",
    }
    for what, url in urls.items():
        error = denied(url)
        assert error["code"] == "DENIED", what
    assert http_get(good)[0] == 200  # the good one still works


def test_a_blob_not_linked_in_the_repository_is_not_served(dp_stack, warm, images):
    """registry:2 lets a repository serve only the blobs linked in it; so does the data plane, even
    with a valid grant, and the proxy hands such a GET to registry:2 (which fails it)."""
    status, _, body = http_get(dataplane_url(dp_stack, grant_for(warm, repository=images["small"].name)))
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert handoff(images["small"].name, warm["layer"])[0] != 307


def test_other_paths_and_methods_are_refused(dp_stack, warm):
    url = dataplane_url(dp_stack, grant_for(warm))
    assert http_get(f"http://127.0.0.1:{DATAPLANE_PORT}/v2/")[0] == 404
    assert http_get(f"http://127.0.0.1:{DATAPLANE_PORT}/_regcache/blob/../../etc/passwd")[0] == 404
    status, _, body = http_get(url, method="DELETE")
    assert status == 405 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_refusals_are_in_the_pull_log(dp_stack, warm):
    before = len(dp_stack.pull_records())
    assert http_get(f"http://127.0.0.1:{DATAPLANE_PORT}/_regcache/blob?refused=yes")[0] == 403

    def refusals(records):
        return [r for r in records[before:] if r["status"] == 403]

    [record] = refusals(dp_stack.pull_records_until(refusals))
    assert (record["method"], record["backend"], record["registry"], record["bytes"]) == ("GET", None, None, 0)


def read_blob_while(stack: Stack, warm: dict, tmp_path: Path, meanwhile) -> tuple[bytes, int, hashlib._Hash]:
    """GET the layer from the data plane on a raw socket, call `meanwhile(data file)` once the
    answer started (the file is put back afterwards); returns the answer's head, the body's
    length and its sha256."""
    data = blob_file(stack, warm["layer"])
    keep = tmp_path / "kept"
    shutil.copy(data, keep)
    path = urlsplit(dataplane_url(stack, grant_for(warm)))
    body, length = hashlib.sha256(), 0
    try:
        with socket.create_connection(("127.0.0.1", DATAPLANE_PORT), timeout=30) as conn:
            conn.sendall(f"GET {path.path}?{path.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head, _, start = conn.recv(65536).partition(b"\r\n\r\n")
            meanwhile(data)
            body.update(start)
            length = len(start)
            try:
                while length < warm["size"] and (chunk := conn.recv(1 << 20)):
                    body.update(chunk)
                    length += len(chunk)
            except ConnectionResetError:
                pass
    finally:
        shutil.copy(keep, data)
    return head, length, body


def test_a_blob_evicted_while_it_is_sent_arrives_whole(dp_stack, warm, tmp_path):
    head, length, body = read_blob_while(dp_stack, warm, tmp_path, Path.unlink)  # as registry:2's TTL expiry does
    assert head.startswith(b"HTTP/1.1 200")
    assert (length, "sha256:" + body.hexdigest()) == (warm["size"], warm["layer"])


def test_a_blob_cut_short_while_it_is_sent_is_never_passed_off_as_whole(dp_stack, warm, tmp_path):
    """The file shrinks under the transfer (nothing registry:2 does, but a disk can): the client
    sees the connection cut before Content-Length bytes came, never a short body that ends cleanly."""
    head, length, _ = read_blob_while(dp_stack, warm, tmp_path, lambda data: os.truncate(data, warm["size"] // 2))
    assert head.startswith(b"HTTP/1.1 200")
    assert length < warm["size"]  # and recv returned b"": the server closed the connection

    def cut(records):
        return [r for r in records if r["error"] and "cut short" in r["error"]]

    [record] = cut(dp_stack.pull_records_until(cut))
    assert record["status"] == 200 and record["backend"] == BACKEND and 0 < record["bytes"] <= warm["size"] // 2


def test_with_the_data_plane_off_every_layer_streams_through_the_proxy(tmp_path, upstream, images):
    port = PORT_BASES["test_dataplane[off]"]
    image = images["big"]
    stack = docker_io_stack(tmp_path, upstream, port, {"REGCACHE_DATAPLANE": "false"}).start()
    try:
        assert not accepts_connections(port + 50)
        for n in range(2):  # cold, then warm
            before = len(stack.pull_records())
            assert pull(f"docker.io.{TEST_DOMAIN}:{port}", image.reference, tmp_path / f"pulled-{n}") == image.manifest_digest
            blobs = [r for r in stack.records_of_pull(image, before) if r["kind"] == "blob"]
            assert {(r["status"], r["backend"]) for r in blobs} == {(200, stack.settings["DOCKERHUB_CACHE"])}
            assert cache_holds(stack.data_dir / "dockerhub/storage", image.blob_digests[-1])
    finally:
        assert stack.stop() == 0
