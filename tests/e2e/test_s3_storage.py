"""Caches on S3-compatible object storage (DOCKERHUB_STORAGE=s3://BUCKET/PREFIX), against a real
S3 server (SeaweedFS, tests/support/s3_server.py): `regcache up` creates the missing bucket and
refuses wrong credentials in one line; pulls go through a cache whose blobs are in the bucket
(once each); warm layers come by the data plane streaming the object (Range too) or by a
presigned URL of the store; with the store stopped, warm pulls get 503 naming it and containerd
falls back, and they are served again once it is back; the budget evicts from the bucket; old
partial uploads are removed from it; two replicas on one bucket share what either fetched. The
data plane's local copies: 8 concurrent GETs make one read of the object (the S3 server's own
request counts: a ranged GET per part), later ones none; a first read the store stops in the
middle of cuts its client after no wrong byte and leaves no copy; a cold pull's spool is kept
as the copy, a copy of other bytes is never sent whole, and with copies off each GET reads the
store. A session token signs regcache's calls and is in no output; a data-plane worker that
cannot reach the store takes it down in /ready.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.clients import Containerd
from tests.support.cluster import GATEWAY, Cluster, SlowReader
from tests.support.parts import (
    PORT_BASES, REGCACHE, TEST_DOMAIN, Stack, build_image, docker_io_stack, get_following_the_307, http_get, poll, pull,
    raw_exchange, raw_request, split_responses,
)
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, S3Server
from regcache_core.commands.client_config import hosts_toml
from regcache_core.config import SETTING, parse_size
from regcache_core.objectstore.copies import COPIES_DIR

PORT = PORT_BASES["test_s3_storage"]
PRESIGNED_PORT = PORT + 3  # its ports (+1, +50, +70, +80) miss the first stack's
BUDGET_PORT = PORT + 5  # the same
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"
REPLICAS_PORT = PORT_BASES["test_s3_storage[replicas]"]
BUCKET, PREFIX = "regcache-test", "caches/hub"
PART_SIZE = parse_size("", SETTING["REGCACHE_S3_READ_PART_SIZE"].default)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Server:
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


def s3_settings(s3: S3Server, **more: str) -> dict:
    return {"DOCKERHUB_STORAGE": f"s3://{BUCKET}/{PREFIX}", "AWS_ENDPOINT_URL_S3": s3.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, **more}


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory, upstream, s3) -> Stack:
    assert s3.keys(BUCKET) is None  # no bucket yet: `regcache up` makes it
    stack = docker_io_stack(tmp_path_factory.mktemp("s3-stack"), upstream, PORT, s3_settings(s3)).start()
    yield stack
    assert stack.stop() == 0
    assert not [line for line in stack.output if "Traceback" in line], "\n".join(stack.output)


def test_the_keys_reach_the_cache_in_its_environment_only(s3_stack):
    config_file = s3_stack.data_dir / "dockerhub/config.yml"
    config = json.loads(config_file.read_text())
    assert config["storage"]["s3"]["bucket"] == BUCKET and config["storage"]["redirect"] == {"disable": True}
    assert SECRET_KEY not in config_file.read_text() and config_file.stat().st_mode & 0o077 == 0
    pid = s3_stack.child(next(p for p in ("docker-registry", "registry") if shutil.which(p)))
    assert SECRET_KEY not in Path(f"/proc/{pid}/cmdline").read_text()
    environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if v)
    assert environ["REGISTRY_STORAGE_S3_SECRETKEY"] == SECRET_KEY and "AWS_CA_BUNDLE" not in environ


def blob_keys(s3: S3Server, digest: str) -> list[str]:
    return [k for k in s3.keys(BUCKET, PREFIX) if k.endswith(f"/blobs/sha256/{digest[7:9]}/{digest[7:]}/data")]


def answer(port: int, path: str, *headers: str) -> tuple[int, dict, bytes]:
    [reply] = split_responses(raw_exchange(port, raw_request(f"GET {path} HTTP/1.1", *headers, host=DOCKER_IO)), ["GET"])
    return reply


def follow(location: str, *headers: str) -> tuple[int, dict, bytes]:
    where = urlsplit(location)
    reply = raw_exchange(where.port, raw_request(f"GET {where.path}?{where.query} HTTP/1.1", *headers, host=where.netloc),
                         timeout=60, address=where.hostname)
    [result] = split_responses(reply, ["GET"])
    return result


@pytest.fixture(scope="module")
def warm(s3_stack, s3, images, tmp_path_factory) -> dict:
    """Both images pulled once, cold: the cache stored every blob in the bucket."""
    for image in images.values():
        assert pull(DOCKER_IO, image.reference, tmp_path_factory.mktemp("cold")) == image.manifest_digest
        for digest in image.blob_digests:
            assert poll(lambda: blob_keys(s3, digest), bool, timeout=30), f"{digest} never reached the bucket"
    return images


def test_the_missing_bucket_is_created_and_a_cold_then_warm_pull_keeps_each_blob_in_it_once(s3_stack, s3, warm,
                                                                                              tmp_path):
    keys = s3.keys(BUCKET, PREFIX)
    # registry:2's layout, and its proxy scheduler's state, under the prefix
    assert {k for k in keys if not k.startswith(f"{PREFIX}/docker/registry/v2/")} == {f"{PREFIX}/scheduler-state.json"}
    assert not [k for k in keys if "regcache-write-check" in k]  # the start's check leaves nothing
    before = len(s3_stack.pull_records())
    for image in warm.values():
        assert pull(DOCKER_IO, image.reference, tmp_path / image.name.replace("/", "_")) == image.manifest_digest
        for digest in image.blob_digests:
            assert len(blob_keys(s3, digest)) == 1
    big = warm["big"]
    records = s3_stack.records_of_pull(big, before)
    layer = [r for r in records if r["reference"] == big.blob_digests[-1] and r["status"] == 200]
    assert layer and all(r["backend"] == "dataplane" and r["cache"] == "hit" for r in layer)


def test_a_warm_layer_is_streamed_from_the_store_by_the_data_plane_range_included(warm):
    big = warm["big"]
    layer = big.blob_digests[-1]
    status, headers, _ = answer(PORT, f"/v2/{big.name}/blobs/{layer}")
    assert status == 307 and urlsplit(headers["location"]).path == "/_regcache/blob"
    status, headers, body = follow(headers["location"])
    assert status == 200 and hashlib.sha256(body).hexdigest() == layer[7:]
    assert headers["docker-content-digest"] == layer and int(headers["content-length"]) == len(body)

    whole = body
    status, headers, _ = answer(PORT, f"/v2/{big.name}/blobs/{layer}")
    status, headers, part = follow(headers["location"], "Range: bytes=1000-1048575")
    assert status == 206 and part == whole[1000:1048576]
    assert headers["content-range"] == f"bytes 1000-1048575/{len(whole)}"
    status, headers, tail = follow(answer(PORT, f"/v2/{big.name}/blobs/{layer}")[1]["location"], "Range: bytes=-100")
    assert status == 206 and tail == whole[-100:]


def copies_of(stack: Stack) -> list[Path]:
    """The data plane's local copies of warm blobs (objectstore/copies.py)."""
    return sorted((stack.data_dir / COPIES_DIR).glob("sha256-*"))


def store_reads(s3: S3Server) -> int:
    """The object reads the S3 server answered: the data plane's (and registry:2's) ranged GETs."""
    return s3.requests(BUCKET, "GET", 206)


def first_read_gets(size: int) -> int:
    """The ranged GETs of a copy's first read of an object of `size` bytes: one per part
    (REGCACHE_S3_READ_PARTS at once, its default above 1), one below two parts."""
    return -(-size // PART_SIZE) if size >= 2 * PART_SIZE else 1


def get_at_once(port: int, path: str, clients: int) -> list[tuple[int, dict, bytes]]:
    """`clients` GETs of `path` at once, each following its 307 as a registry client does."""
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda _: get_following_the_307(port, path, f"docker.io.{TEST_DOMAIN}:{port}"),
                             range(clients)))


def test_concurrent_gets_of_a_warm_layer_share_one_read_of_the_store_and_later_ones_are_sent_its_local_copy(
        s3_stack, s3, warm):
    big = warm["big"]
    layer = big.blob_digests[-1]
    path = f"/v2/{big.name}/blobs/{layer}"
    for copy in copies_of(s3_stack):
        copy.unlink()  # earlier tests made one: this test's first GETs find none
    before = store_reads(s3)
    answers = get_at_once(PORT, path, 8)
    assert [(status, hashlib.sha256(body).hexdigest()) for status, _, body in answers] == [(200, layer[7:])] * 8
    assert store_reads(s3) == before + first_read_gets(len(answers[0][2]))  # one read, by parts
    [copy] = copies_of(s3_stack)
    assert copy.name == layer.replace(":", "-") and copy.stat().st_mode & 0o777 == 0o400  # sealed, its owner's only

    answers = get_at_once(PORT, path, 8)
    assert [(status, hashlib.sha256(body).hexdigest()) for status, _, body in answers] == [(200, layer[7:])] * 8
    status, headers, _ = answer(PORT, path)
    status, headers, part = follow(headers["location"], "Range: bytes=7-1000006")
    assert status == 206 and hashlib.sha256(part).digest() == hashlib.sha256(answers[0][2][7:1000007]).digest()
    assert store_reads(s3) == before + first_read_gets(len(answers[0][2]))  # the copy, not the store


def test_a_cold_layer_s_spool_is_kept_as_its_copy_and_a_copy_of_other_bytes_is_never_sent_whole(
        s3_stack, s3, upstream, tmp_path):
    """A cold pull's spool (its bytes checked) becomes the layer's copy: its first warm GET reads
    nothing from the store. Then the object in the store altered (same size), the copy gone: the
    copy written from it does not hash to the digest, so the GETs reading it are cut short, and
    nothing of it stays."""
    image = build_image(tmp_path / "images", "library/altered", [("layer.bin", 3 << 20)])
    upstream.push(image)
    assert pull(DOCKER_IO, image.reference, tmp_path / "cold") == image.manifest_digest
    layer = image.blob_digests[-1]
    assert poll(lambda: blob_keys(s3, layer), bool, timeout=60)
    [key] = blob_keys(s3, layer)
    assert (s3_stack.data_dir / COPIES_DIR / layer.replace(":", "-")) in copies_of(s3_stack)
    before = store_reads(s3)
    status, _, body = get_following_the_307(PORT, f"/v2/{image.name}/blobs/{layer}", DOCKER_IO)
    assert status == 200 and hashlib.sha256(body).hexdigest() == layer[7:] and store_reads(s3) == before
    original = s3.get(BUCKET, key)
    for copy in copies_of(s3_stack):
        copy.unlink()
    s3.put(BUCKET, key, original[:-1] + bytes([original[-1] ^ 1]))
    try:
        answers = get_at_once(PORT, f"/v2/{image.name}/blobs/{layer}", 2)
        assert [(status, len(body) < len(original)) for status, _, body in answers] == [(200, True)] * 2
        assert copies_of(s3_stack) == []
        assert any("the local copy of" in line and "hash to" in line for line in s3_stack.output)
    finally:
        s3.put(BUCKET, key, original)
    status, _, body = get_following_the_307(PORT, f"/v2/{image.name}/blobs/{layer}", DOCKER_IO)
    assert status == 200 and body == original  # put right in the store: a copy of it serves


def test_with_copies_turned_off_each_get_streams_the_object_from_the_store(warm, upstream, s3, tmp_path):
    stack = docker_io_stack(tmp_path / "no-copies", upstream, PRESIGNED_PORT,
                            s3_settings(s3, REGCACHE_S3_COPIES_MAX_DISK="0")).start()
    try:
        big = warm["big"]
        layer = big.blob_digests[-1]
        before = store_reads(s3)
        answers = get_at_once(PRESIGNED_PORT, f"/v2/{big.name}/blobs/{layer}", 2)
        assert [(status, hashlib.sha256(body).hexdigest()) for status, _, body in answers] == [(200, layer[7:])] * 2
        assert store_reads(s3) == before + 2 and copies_of(stack) == []
    finally:
        assert stack.stop() == 0


def test_a_small_warm_blob_is_answered_by_the_proxy_from_the_store(warm):
    small = warm["small"]
    config = small.blob_digests[0]
    status, headers, body = answer(PORT, f"/v2/{small.name}/blobs/{config}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == config[7:]
    assert headers["docker-content-digest"] == config


def test_a_warm_layer_by_a_presigned_url_of_the_store(warm, upstream, s3, tmp_path):
    """A second stack on the same bucket (another data dir), with REGCACHE_S3_REDIRECT: what the
    first one stored is warm here too, and its layers are 307s to the store itself."""
    stack = docker_io_stack(tmp_path / "presigned", upstream, PRESIGNED_PORT,
                            s3_settings(s3, REGCACHE_S3_REDIRECT="true")).start()
    try:
        big = warm["big"]
        layer = big.blob_digests[-1]
        [(status, headers, _)] = split_responses(raw_exchange(PRESIGNED_PORT, raw_request(
            f"GET /v2/{big.name}/blobs/{layer} HTTP/1.1", host=f"docker.io.{TEST_DOMAIN}:{PRESIGNED_PORT}")), ["GET"])
        assert status == 307 and headers["location"].startswith(f"{s3.endpoint}/{BUCKET}/{PREFIX}/docker/registry/v2/blobs/")
        assert "X-Amz-Signature=" in headers["location"]
        status, _, body = http_get(headers["location"], timeout=60)
        assert status == 200 and hashlib.sha256(body).hexdigest() == layer[7:]
        status, _, part = http_get(headers["location"], headers={"Range": "bytes=5-9"})
        assert status == 206 and part == body[5:10]
        assert pull(f"docker.io.{TEST_DOMAIN}:{PRESIGNED_PORT}", big.reference, tmp_path / "pulled") == big.manifest_digest
    finally:
        assert stack.stop() == 0


def test_a_session_token_signs_regcache_s_calls_and_is_in_no_output(tmp_path, upstream, s3):
    """SeaweedFS knows no session tokens (its identities are static keys): its refusal of the
    token, with keys it accepts, shows that regcache signs with it. registry:2 gets it in its
    environment (tests/unit/test_s3_config.py): 2.8's s3 driver has no config key for it."""
    token = "FwoGZXIvYXdzEXAMPLE-session-token"
    settings = docker_io_stack(tmp_path, upstream, PRESIGNED_PORT, s3_settings(s3, AWS_SESSION_TOKEN=token)).settings
    result = subprocess.run([*REGCACHE, "up"], cwd=tmp_path, env={**settings, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "the store refused the credentials" in line and "AWS_SESSION_TOKEN" in line, line
    assert token not in result.stdout + result.stderr
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and token.encode() in f.read_bytes()]


def test_wrong_credentials_are_one_clear_line_at_start(tmp_path, upstream, s3):
    settings = docker_io_stack(tmp_path, upstream, PRESIGNED_PORT,
                               s3_settings(s3, AWS_SECRET_ACCESS_KEY="not-the-secret")).settings
    result = subprocess.run([*REGCACHE, "up"], cwd=tmp_path, env={**settings, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"regcache: DOCKERHUB_STORAGE: s3://{BUCKET}/{PREFIX} at {s3.endpoint}: the store refused the credentials "
        "(403 SignatureDoesNotMatch): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"]
    assert "not-the-secret" not in result.stdout + result.stderr


def test_with_the_store_stopped_warm_pulls_get_503_naming_it_and_containerd_falls_back(s3_stack, s3, warm, upstream,
                                                                                      tmp_path):
    big = warm["big"]
    layer = big.blob_digests[-1]
    s3.stop()
    try:
        status, _, body = answer(PORT, f"/v2/{big.name}/blobs/{layer}")
        assert status == 503
        [error] = json.loads(body)["errors"]
        assert error["code"] == "UNAVAILABLE" and s3.endpoint in error["message"]
        ready = json.loads(s3_stack.admin("/ready")[2])
        assert ready["object_store"].startswith("down: ")
        assert s3_stack.metrics()[("regcache_object_store_up", ())] == 0
        # Again: at once, without another warning.
        assert answer(PORT, f"/v2/{big.name}/blobs/{layer}")[0] == 503

        containerd = Containerd(tmp_path / "containerd").start()
        try:
            hosts_dir = tmp_path / "certs.d"
            (hosts_dir / "docker.io").mkdir(parents=True)
            (hosts_dir / "docker.io/hosts.toml").write_text(hosts_toml(upstream.url, f"http://{DOCKER_IO}"))
            result = containerd.pull(f"docker.io/{big.reference}", hosts_dir)
            assert result.returncode == 0, result.stderr
            assert containerd.image_digest(f"docker.io/{big.reference}") == big.manifest_digest
        finally:
            containerd.stop()
    finally:
        s3.start()
    assert poll(lambda: answer(PORT, f"/v2/{big.name}/blobs/{layer}")[0], lambda status: status == 307, timeout=30) == 307
    assert json.loads(s3_stack.admin("/ready")[2])["object_store"] == "up"
    warnings = [line for line in s3_stack.output if "object store" in line]
    assert [bool(re.search("unreachable", w)) for w in warnings] == [True, False], "\n".join(warnings)
    assert "reachable again" in warnings[1]


def test_a_data_plane_worker_that_cannot_reach_the_store_takes_it_down_in_ready(s3_stack, s3, warm):
    """The proxy hands a warm layer to the data plane, then the store stops: the worker's failure,
    not the proxy's own calls, takes the store down (/ready, 503s), until the probe finds it back."""
    big = warm["big"]
    path = f"/v2/{big.name}/blobs/{big.blob_digests[-1]}"
    status, headers, _ = answer(PORT, path)
    assert status == 307 and json.loads(s3_stack.admin("/ready")[2])["object_store"] == "up"
    s3.stop()
    try:
        status, _, body = follow(headers["location"])
        assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        ready = poll(lambda: json.loads(s3_stack.admin("/ready")[2])["object_store"],
                     lambda state: state != "up", timeout=10)
        assert ready.startswith("down: a data-plane worker: ")
        assert answer(PORT, path)[0] == 503  # the proxy's answer, at once
    finally:
        s3.start()
    assert poll(lambda: json.loads(s3_stack.admin("/ready")[2])["object_store"], lambda state: state == "up",
                timeout=30) == "up"


def test_a_first_read_by_parts_cut_by_the_store_stopping_cuts_its_client_after_no_wrong_byte_and_keeps_no_copy(
        s3_stack, s3, warm):
    """The store serves each connection at 5 MB/s (as AWS S3 does, slower), so the copy's first
    read of the 100 MiB layer, by parts, takes seconds; the store stops once its first bytes
    reached the client."""
    big = warm["big"]
    layer = big.blob_digests[-1]
    [key] = blob_keys(s3, layer)
    original = s3.get(BUCKET, key)
    assert len(original) >= 3 * PART_SIZE  # parts at once
    for copy in copies_of(s3_stack):
        copy.unlink()
    s3.limit_each_connection(5)
    try:
        with ThreadPoolExecutor(1) as pool:
            got = pool.submit(get_following_the_307, PORT, f"/v2/{big.name}/blobs/{layer}", DOCKER_IO)
            assert poll(lambda: [c.stat().st_size for c in copies_of(s3_stack)], lambda sizes: sizes and sizes[0] > 0,
                        timeout=30)
            s3.stop()
            status, headers, body = got.result()
        assert status == 200 and int(headers["content-length"]) == len(original)
        assert 0 < len(body) < len(original) and body == original[:len(body)]
        assert poll(lambda: copies_of(s3_stack), lambda copies: copies == [], timeout=10) == []
        assert any("the local copy of" in line and layer[:19] in line for line in s3_stack.output)
    finally:
        s3.unlimit()
        s3.start()
    assert poll(lambda: json.loads(s3_stack.admin("/ready")[2])["object_store"], lambda state: state == "up",
                timeout=30) == "up"
    assert hashlib.sha256(get_following_the_307(PORT, f"/v2/{big.name}/blobs/{layer}", DOCKER_IO)[2]).hexdigest() \
        == layer[7:]


def test_the_budget_evicts_from_the_bucket_and_cache_du_and_ls_read_it(upstream, s3, images, tmp_path):
    """A stack of its own on another prefix with a 150 MiB budget: the session's 100 MiB image,
    then one of 60 MiB; the least recently pulled goes from the bucket, with its links."""
    prefix = "caches/budget"
    second = build_image(tmp_path / "images", "library/second", [("layer.bin", 60 << 20)])
    upstream.push(second)
    stack = docker_io_stack(tmp_path / "budget", upstream, BUDGET_PORT,
                            s3_settings(s3, DOCKERHUB_STORAGE=f"s3://{BUCKET}/{prefix}", DOCKERHUB_MAX_DISK="150M")).start()
    host = f"docker.io.{TEST_DOMAIN}:{BUDGET_PORT}"
    big = images["big"]

    def stored(image) -> bool:
        digest = image.blob_digests[-1]
        return any(k.endswith(f"/{digest[7:]}/data") for k in s3.keys(BUCKET, prefix))

    try:
        assert pull(host, big.reference, tmp_path / "big") == big.manifest_digest
        # registry:2 stores it after the pull (spool/cache_fill.py), uploading 100 MiB to the
        # store: 30 s was once too short in a full CI run on a busy machine.
        assert poll(lambda: stored(big), bool, timeout=120)
        assert pull(host, second.reference, tmp_path / "second") == second.manifest_digest
        evicted = poll(lambda: [line for line in stack.output if "disk budget: evicted" in line], bool, timeout=60)
        assert "now 60.0 MiB of 150.0 MiB" in evicted[0], evicted
        assert (stored(second), stored(big)) == (True, False)
        keys = s3.keys(BUCKET, prefix)
        assert not [k for k in keys if f"/repositories/{big.name}/_layers/sha256/{big.blob_digests[-1][7:]}/" in k]
        assert sum(1 for k in keys if "/repositories/library/second/_layers/" in k) == len(second.blob_digests)

        du = stack.command("cache", "du", "--json")
        assert du.returncode == 0, du.stderr
        [cache] = json.loads(du.stdout)["caches"]
        assert cache["storage"] == f"s3://{BUCKET}/{prefix}" and cache["free_disk"] is None
        assert 60 << 20 < cache["bytes"] <= 150 << 20
        assert [r["repository"] for r in cache["repositories"]] == ["library/second"]
        ls = stack.command("cache", "ls")
        assert ls.returncode == 0 and "library/second" in ls.stdout and big.name not in ls.stdout, ls.stdout + ls.stderr
    finally:
        assert stack.stop() == 0


def test_partial_uploads_older_than_hours_are_removed_from_the_bucket_at_start_and_pulls_go_on(
        warm, upstream, s3, tmp_path):
    """A stack of its own on another prefix, where cut writes left two uploads: one registry:2
    began two days ago (only its `startedat`: its data never completed) and one begun now. At
    start the old one goes, the new one stays, and a pull through the cache works."""
    prefix = "caches/uploads"
    uploads = f"{prefix}/docker/registry/v2/repositories/library/small/_uploads"
    old, fresh = f"{uploads}/{uuid.uuid4()}", f"{uploads}/{uuid.uuid4()}"
    s3.put(BUCKET, f"{old}/startedat", rfc3339(time.time() - 2 * 86400))
    s3.put(BUCKET, f"{fresh}/startedat", rfc3339(time.time()))
    s3.put(BUCKET, f"{fresh}/data", b"the first bytes of a blob")
    stack = docker_io_stack(tmp_path / "uploads", upstream, PRESIGNED_PORT,
                            s3_settings(s3, DOCKERHUB_STORAGE=f"s3://{BUCKET}/{prefix}")).start()
    try:
        assert poll(lambda: [k for k in s3.keys(BUCKET, old) if not k.endswith("/")], lambda keys: not keys,
                    timeout=60) == []
        assert set(s3.keys(BUCKET, fresh)) >= {f"{fresh}/startedat", f"{fresh}/data"}
        assert [line for line in stack.output if "removed 1 partial upload older than 6 h" in line], stack.output
        small = warm["small"]
        host = f"docker.io.{TEST_DOMAIN}:{PRESIGNED_PORT}"
        assert pull(host, small.reference, tmp_path / "pulled") == small.manifest_digest
    finally:
        assert stack.stop() == 0


def rfc3339(when: float) -> bytes:
    """A `startedat` as registry:2 writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)).encode()


def test_two_replicas_on_one_bucket_a_blob_one_fetched_is_warm_on_the_other(tmp_path_factory, images):
    """Two replicas (tests/support/cluster.py, with their Redis), their caches on one bucket and
    prefix: a layer pulled cold through one is stored once, and the other sends it warm from the
    store by its data plane, without asking the upstream, registered for every replica's budget
    while it does (and the URL handed out, for the 5 minutes it is valid)."""
    tmp_path = tmp_path_factory.mktemp("s3rep")  # short: a replica's data dir holds a unix socket
    store = S3Server(tmp_path / "s3", bind="0.0.0.0").start()  # the replicas reach it at the gateway
    prefix = "caches/replicas"
    settings = {**s3_settings(store, DOCKERHUB_STORAGE=f"s3://{BUCKET}/{prefix}"),
                "AWS_ENDPOINT_URL_S3": f"http://{GATEWAY}:{store.port}"}
    try:
        with Cluster(tmp_path / "cluster", REPLICAS_PORT, replicas=2, settings=settings) as cluster:
            big = images["big"]
            cluster.upstream.push(big)
            layer = big.blob_digests[-1]
            path = f"/v2/{big.name}/blobs/{layer}"
            first, second = cluster.replicas

            def from_replica(replica, *headers) -> tuple[int, dict, bytes]:
                request = raw_request(f"GET {path} HTTP/1.1", *headers, host=f"docker.io.{TEST_DOMAIN}:{REPLICAS_PORT}")
                [(status, answer_headers, body)] = split_responses(
                    raw_exchange(REPLICAS_PORT, request, timeout=120, address=replica.address), ["GET"])
                return status, answer_headers, body

            status, headers, _ = from_replica(first)
            assert status == 307 and urlsplit(headers["location"]).path == "/_regcache/cold"  # cold on the first
            status, _, body = follow(headers["location"])
            assert status == 200 and hashlib.sha256(body).hexdigest() == layer[7:]
            assert poll(lambda: len([k for k in store.keys(BUCKET, prefix) if k.endswith(f"/{layer[7:]}/data")]),
                        lambda count: count == 1, timeout=60)
            fetched = len(cluster.upstream.requests_for(layer, "GET"))

            status, headers, _ = from_replica(second)
            location = urlsplit(headers["location"])
            assert status == 307 and location.path == "/_regcache/blob"  # warm on the second
            assert location.hostname == second.address
            assert poll(lambda: cluster.reads_registered(layer, urls=True), bool)  # valid 5 min: no replica evicts it
            status, _, body = follow(headers["location"])
            assert status == 200 and hashlib.sha256(body).hexdigest() == layer[7:]
            status, _, part = follow(headers["location"], "Range: bytes=1048576-")
            assert status == 206 and part == body[1 << 20:]
            assert len(cluster.upstream.requests_for(layer, "GET")) == fetched  # nothing more upstream
            assert len([k for k in store.keys(BUCKET, prefix) if k.endswith(f"/{layer[7:]}/data")]) == 1
            # While the second's data plane streams the object, no replica's budget evicts it.
            reader = SlowReader(second.address, REPLICAS_PORT, big, layer)
            try:
                assert poll(lambda: cluster.reads_registered(layer), bool)
                assert reader.read_to_the_end() == layer
            finally:
                reader.close()
            assert not poll(lambda: cluster.reads_registered(layer), lambda registered: not registered)
    finally:
        store.stop()
