"""End to end: one upstream fetch per cold blob, whatever asks (single-flight spools, spool.py).

Real parts: skopeo pulls through `regcache up` (registry:2 cache, proxy, data plane) from a real
registry upstream, and the upstream's access log says what reached it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from regcache_core.dataplane.server import BACKEND as DATAPLANE
from tests.support.fakes import Cdn, SlowLink
from tests.support.parts import (
    PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Stack, Upstream, at_once, blob_bytes, cache_holds, child_pids,
    command_line, docker_io_stack, get_following_the_307, poll, skopeo,
)

PORT = PORT_BASES["test_single_flight"]
OWN_UPSTREAM_PORT = PORT_BASES["test_single_flight[own upstream]"]  # its tests run one after the other
PULLS = 8


def pull_at_once(host: str, reference: str, destinations: list[Path]) -> list:
    """One skopeo copy per destination, all started together; their CompletedProcesses."""
    return at_once(len(destinations), lambda i: skopeo("copy", "--src-tls-verify=false", f"docker://{host}/{reference}",
                                                       f"oci:{destinations[i]}", timeout=180))


def layer_digest_in(layout: Path, digest: str) -> str:
    """The digest of the blob file skopeo wrote for `digest`, hashed here."""
    hasher = hashlib.sha256()
    with open(layout / "blobs/sha256" / digest.split(":")[1], "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


def fetches_of_cache(upstream: Upstream) -> list:
    """The upstream's access log without the proxy's own `GET /v2/` (how to authenticate, learnt
    once per registry: no fetch of a cache)."""
    return [line for line in upstream.access_log() if line.path != "/v2/"]


def metric_sum(stack: Stack, name: str) -> float:
    return sum(value for (sample, _), value in stack.metrics().items() if sample == name)


def get_at_once(port: int, host: str, path: str, count: int) -> list:
    """`count` raw-socket GETs of `path` following the 307, all started together: their answers."""
    return at_once(count, lambda _: get_following_the_307(port, path, host))


def test_concurrent_cold_pulls_make_one_upstream_fetch_of_the_layer(tmp_path, upstream, images):
    """4 skopeo pulls and 4 raw GETs of the layer at once: each follows the proxy's 307 to the
    download's spool on the data plane, and the cache stores the layer from the same spool."""
    image = images["big"]
    layer = image.blob_digests[-1]
    host = f"docker.io.{TEST_DOMAIN}:{PORT}"
    stack = docker_io_stack(tmp_path / "stack", upstream, PORT).start()
    try:
        before = len(upstream.requests_for(layer, "GET"))
        heads_before = len(upstream.requests_for(layer, "HEAD"))
        asked_before = len(fetches_of_cache(upstream))
        destinations = [tmp_path / f"pulled-{i}" for i in range(PULLS // 2)]
        raw: list = []
        getter = threading.Thread(target=lambda: raw.extend(
            get_at_once(PORT, host, f"/v2/{image.name}/blobs/{layer}", PULLS // 2)))
        getter.start()
        results = pull_at_once(host, image.reference, destinations)
        getter.join(180)
        assert [r.returncode for r in results] == [0] * len(destinations), [r.stderr for r in results if r.returncode]
        for destination in destinations:
            assert layer_digest_in(destination, layer) == layer
        for status, headers, body in raw:
            assert (status, headers["docker-content-digest"]) == (200, layer)
            assert f"sha256:{hashlib.sha256(body).hexdigest()}" == layer
        assert cache_holds(stack.data_dir / "dockerhub/storage", layer, timeout=60), "the cache stored the layer"

        def layer_gets(records: list[dict]) -> list[dict]:
            return [r for r in records if (r["reference"], r["method"]) == (layer, "GET")]

        # Each client's GET leaves two records: the proxy's 307 and the data plane's transfer.
        records = layer_gets(stack.pull_records_until(lambda rs: len(layer_gets(rs)) == 2 * PULLS))
        redirects = [r for r in records if r["status"] == 307]
        transfers = [r for r in records if r["backend"] == DATAPLANE]
        assert len(redirects) == len(transfers) == PULLS, records
        for part in (redirects, transfers):
            assert sorted(r["cache"] for r in part) == ["hit"] * (PULLS - 1) + ["miss"], "one miss: the pull that brought it"
        assert all(r["bytes"] == len(body) and r["status"] == 200 for r in transfers)
        assert metric_sum(stack, "regcache_spool_followers_total") >= PULLS
        # Every fetch that reached the upstream is counted once in the metrics, and no other.
        counted = metric_sum(stack, "regcache_upstream_fetches_total")
        assert poll(lambda: len(fetches_of_cache(upstream)) - asked_before, lambda n: n == counted) == counted
    finally:
        stack.stop()
    fetches = upstream.requests_for(layer, "GET")[before:]
    assert len(fetches) == 1, f"the upstream was asked for the layer {len(fetches)} times: {fetches}"
    heads = upstream.requests_for(layer, "HEAD")[heads_before:]
    assert len(heads) <= 1, f"the upstream was asked {len(heads)} HEADs of the layer: {heads}"


@pytest.fixture
def slow_upstream(tmp_path, images):
    """An upstream of its own (a test kills it) behind a slow link, holding the big image."""
    registry = Upstream(tmp_path / "upstream", OWN_UPSTREAM_PORT + UPSTREAM_OFFSET).start()
    registry.push(images["big"])
    link = SlowLink(OWN_UPSTREAM_PORT + UPSTREAM_OFFSET + 1, registry.port, rate=20e6).start()
    yield registry, link
    link.stop()
    registry.stop()


@pytest.fixture
def slow_stack(tmp_path, slow_upstream):
    """A stack of its own in front of the slow link, stopped after the test."""
    registry, link = slow_upstream
    stack = docker_io_stack(tmp_path / "stack", registry, OWN_UPSTREAM_PORT, {"DOCKERHUB_UPSTREAM": link.url}).start()
    yield stack
    stack.stop()


SLOW_HOST = f"docker.io.{TEST_DOMAIN}:{OWN_UPSTREAM_PORT}"


def gets_in_background(path: str, count: int) -> tuple[threading.Thread, list]:
    """`count` raw GETs of `path` from the slow stack, following the 307, started together in a
    thread: the thread, and the list their answers go to."""
    answers: list = []
    thread = threading.Thread(target=lambda: answers.extend(get_at_once(OWN_UPSTREAM_PORT, SLOW_HOST, path, count)))
    thread.start()
    return thread, answers


def spooling_between(spools: Path, low: int, high: int) -> list[int]:
    """The sizes of the spool files once one of them is between `low` and `high` bytes (empty: never)."""
    return poll(lambda: [f.stat().st_size for f in spools.iterdir()], lambda sizes: any(
        low < size < high for size in sizes), timeout=60)


def cold_gets_under_way(images, slow_upstream, slow_stack, count: int, up_to: int):
    """`count` raw GETs of the big image's layer from the slow stack, under way once its spool
    holds more than 10 MiB and less than `up_to` bytes: (registry, image, layer, spools, the
    GETs' thread, their answers)."""
    registry, _ = slow_upstream
    image = images["big"]
    layer = image.blob_digests[-1]
    spools = slow_stack.data_dir / "spools"
    getter, answers = gets_in_background(f"/v2/{image.name}/blobs/{layer}", count)
    assert spooling_between(spools, 10 << 20, up_to), "the layer was never spooled"
    return registry, image, layer, spools, getter, answers


def assert_cut_short(answers: list, whole: bytes) -> None:
    """Every reader cut short of the blob's length, never given a wrong byte."""
    for status, headers, body in answers:
        assert (status, headers["content-length"]) == (200, str(len(whole)))
        assert len(body) < len(whole) and body == whole[:len(body)]


def assert_next_pull_whole(tmp_path: Path, image, layer: str) -> None:
    destination = tmp_path / "after"
    result = skopeo("copy", "--src-tls-verify=false", f"docker://{SLOW_HOST}/{image.reference}", f"oci:{destination}")
    assert result.returncode == 0, result.stderr
    assert layer_digest_in(destination, layer) == layer


def test_upstream_killed_midway_fails_every_follower_and_leaves_no_spool(tmp_path, images, slow_upstream, slow_stack):
    registry, _ = slow_upstream
    image = images["big"]
    layer = image.blob_digests[-1]
    host, stack = SLOW_HOST, slow_stack
    spools = stack.data_dir / "spools"
    results: list = []
    pulls = threading.Thread(target=lambda: results.extend(
        pull_at_once(host, image.reference, [tmp_path / f"pulled-{i}" for i in range(4)])))
    pulls.start()
    getter, raw = gets_in_background(f"/v2/{image.name}/blobs/{layer}", 4)
    halfway = spooling_between(spools, 10 << 20, 80 << 20)
    followers = poll(lambda: metric_sum(stack, "regcache_spool_followers_total"), lambda n: n >= 8, timeout=10)
    assert halfway and followers >= 8, (halfway, followers)
    registry.process.kill()  # SIGKILL: the upstream is gone mid-layer
    registry.process.wait()
    pulls.join(180)
    getter.join(180)
    assert [r.returncode != 0 for r in results] == [True] * 4, [r.stdout for r in results]
    assert_cut_short(raw, blob_bytes(registry, layer))
    assert poll(lambda: list(spools.iterdir()), lambda files: not files) == []
    registry.start()
    assert_next_pull_whole(tmp_path, image, layer)


def test_the_download_worker_killed_midway_cuts_every_reader_and_the_next_pull_is_whole(tmp_path, images, slow_upstream,
                                                                                        slow_stack):
    """The proxy's download worker (the process that moves a cold layer's bytes into its spool)
    is SIGKILLed mid-layer: every reader is cut short, never given a wrong byte; the proxy goes
    on, and the next pull starts a new worker and is whole."""
    registry, image, layer, spools, getter, raw = cold_gets_under_way(images, slow_upstream, slow_stack, 4, 80 << 20)
    proxy = slow_stack.child("mitmdump")
    [worker] = [pid for pid in child_pids(proxy) if "regcache_core.spool.worker" in command_line(pid)]
    os.kill(worker, signal.SIGKILL)
    getter.join(180)
    assert len(raw) == 4
    assert_cut_short(raw, blob_bytes(registry, layer))
    assert poll(lambda: list(spools.iterdir()), lambda files: not files) == []
    assert_next_pull_whole(tmp_path, image, layer)
    assert slow_stack.child("mitmdump") == proxy, "the proxy went on"


def test_the_client_that_started_a_cold_pull_leaving_midway_cuts_no_other_pull(tmp_path, images, slow_upstream, slow_stack):
    """Ctrl-C on the first `docker pull` of a layer: registry:2 cancels the fetch that pull made,
    but the download is the proxy's, so the other pulls of the layer complete, and the next pull
    is served without asking the upstream again."""
    registry, _ = slow_upstream
    image = images["big"]
    layer = image.blob_digests[-1]
    host, stack = SLOW_HOST, slow_stack
    spools = stack.data_dir / "spools"
    first = subprocess.Popen(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                              f"docker://{host}/{image.reference}", f"oci:{tmp_path / 'first'}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = poll(lambda: [f.stat().st_size for f in spools.iterdir()], lambda sizes: any(
            size > 10 << 20 for size in sizes), timeout=60)
        assert started, "the first pull's layer was never spooled"
        results: list = []
        others = threading.Thread(target=lambda: results.extend(
            pull_at_once(host, image.reference, [tmp_path / f"pulled-{i}" for i in range(3)])))
        others.start()
        # The first pull's fetch, then one per other pull (skopeo fetches the config after the
        # layers; the cache is asked to store the layer once the download is complete).
        followers = poll(lambda: metric_sum(stack, "regcache_spool_followers_total"), lambda n: n >= 4, timeout=30)
        sizes = [f.stat().st_size for f in spools.iterdir()]
        assert followers >= 4 and all(size < 90 << 20 for size in sizes), (followers, sizes)
    finally:
        first.kill()  # SIGKILL mid-layer: its connection to regcache is gone at once
        first.wait()
    others.join(180)
    assert [r.returncode for r in results] == [0] * 3, [r.stderr for r in results if r.returncode]
    for i in range(3):
        assert layer_digest_in(tmp_path / f"pulled-{i}", layer) == layer
    assert len(registry.requests_for(layer, "GET")) == 1, registry.requests_for(layer)

    destination = tmp_path / "next"
    result = skopeo("copy", "--src-tls-verify=false", f"docker://{host}/{image.reference}", f"oci:{destination}")
    assert result.returncode == 0, result.stderr
    assert layer_digest_in(destination, layer) == layer
    assert len(registry.requests_for(layer, "GET")) == 1, registry.requests_for(layer)
    # One miss (the pull the download started for), the others and the next pull hits: in the
    # proxy's records (a 307 each) and in the data plane's (a transfer each).
    records = stack.pull_records_until(lambda rs: sum((r["reference"], r["method"]) == (layer, "GET") for r in rs) == 10)
    layer_gets = [r for r in records if (r["reference"], r["method"]) == (layer, "GET")]
    for part in ([r for r in layer_gets if r["status"] == 307], [r for r in layer_gets if r["backend"] == DATAPLANE]):
        assert [r["cache"] for r in part].count("miss") == 1 and part[-1]["cache"] == "hit", layer_gets


def test_when_the_upstream_redirects_to_a_cdn_the_cdn_is_asked_once(tmp_path, images):
    """Docker Hub answers blob GETs with a 307 to its CDN: the download follows it, and every
    fetch follows the download's spool."""
    image = images["small"]
    cdn = Cdn(tmp_path / "upstream" / "storage", OWN_UPSTREAM_PORT + UPSTREAM_OFFSET + 2).start()
    registry = Upstream(tmp_path / "upstream", OWN_UPSTREAM_PORT + UPSTREAM_OFFSET,
                        {"middleware": cdn.registry_middleware()}).start()
    stack = None
    try:
        registry.push(image)
        stack = docker_io_stack(tmp_path / "stack", registry, OWN_UPSTREAM_PORT).start()
        destinations = [tmp_path / f"pulled-{i}" for i in range(PULLS)]
        results = pull_at_once(f"docker.io.{TEST_DOMAIN}:{OWN_UPSTREAM_PORT}", image.reference, destinations)
        assert [r.returncode for r in results] == [0] * PULLS, [r.stderr for r in results if r.returncode]
        for digest in image.blob_digests[1:]:  # the layers: registry:2 redirects those
            cdn_gets = [path for method, path, _ in cdn.requests if method == "GET" and digest.split(":")[1] in path]
            assert len(cdn_gets) == 1, f"the CDN was asked for {digest} {len(cdn_gets)} times"
            assert all(layer_digest_in(destination, digest) == digest for destination in destinations)
    finally:
        if stack:
            stack.stop()
        registry.stop()
        cdn.stop()


def test_sigterm_midway_lets_the_download_and_its_readers_finish(images, slow_upstream, slow_stack):
    """The stack gets SIGTERM while a client reads a cold layer from the data plane and the
    proxy's download of it is still under way: the proxy stops taking connections but waits for
    the download, the client gets the whole layer, and the stack exits 0."""
    registry, _, layer, _, getter, raw = cold_gets_under_way(images, slow_upstream, slow_stack, 1, 60 << 20)
    slow_stack.process.send_signal(signal.SIGTERM)
    getter.join(120)
    [(status, _, body)] = raw
    assert status == 200 and body == blob_bytes(registry, layer)
    assert slow_stack.process.wait(60) == 0
