"""Replicas' shared state (issue 19), end to end on the cluster test bed (tests/support/cluster.py):
three `regcache up` in network namespaces of their own behind HAProxy, one redis-server, one
upstream, one cache storage.

Tags, cold manifests and the disk budget are the cluster's: what reached the upstream is read
from its access log, whichever replicas the balancer sent the clients to. Redis killed or
paused under load fails no pull and is said once per replica; once it is back, the replicas
share state again.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime

import pytest

from tests.support.cluster import Cluster, SlowReader
from tests.support.parts import (
    MANIFEST_TYPES, PORT_BASES, Upstream, at_once, build_image, build_multiarch_image, cache_holds, http_get, poll,
    push_index, skopeo, storage_bytes,
)

PORT = PORT_BASES["test_cluster_state"]
TTL = 3.0
BUDGET = 40 << 20  # three of the budget test's 11 MiB images fit, four do not: one goes
REDIS_DOWN = "unreachable"  # in the link's warning line


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("cluster-state"), PORT,
                 settings={"REGCACHE_TAG_TTL": str(TTL), "REGCACHE_MAX_DISK": "40M"}) as cluster:
        yield cluster


def manifest(address: str, name: str, reference: str) -> tuple[int, dict, bytes]:
    """A manifest GET on a connection of its own: through the balancer (127.0.0.1), or to one replica."""
    return http_get(f"http://{address}:{PORT}/v2/{name}/manifests/{reference}", host=f"docker.io.regcache.test:{PORT}",
                    headers={"Accept": MANIFEST_TYPES})


def pulled_digest(cluster: Cluster, reference: str, destination) -> tuple[int, str, str | None]:
    """skopeo copy through the balancer: (exit status, its error output, the manifest digest it stored)."""
    result = skopeo("copy", "--src-tls-verify=false", f"docker://{cluster.host}/{reference}", f"oci:{destination}", timeout=180)
    if result.returncode != 0:
        return result.returncode, result.stderr, None
    return 0, "", json.loads((destination / "index.json").read_text())["manifests"][0]["digest"]


def pull_from(address: str, image) -> None:
    """A pull from one replica, as a client makes it: the manifest by tag, then each blob (a warm
    or cold one's 307 to that replica's data plane followed), every digest checked."""
    status, _, body = manifest(address, image.name, image.tag)
    assert (status, "sha256:" + hashlib.sha256(body).hexdigest()) == (200, image.manifest_digest)
    for digest in image.blob_digests:
        status, _, blob = http_get(f"http://{address}:{PORT}/v2/{image.name}/blobs/{digest}",
                                   host=f"docker.io.regcache.test:{PORT}", timeout=120)
        assert (status, "sha256:" + hashlib.sha256(blob).hexdigest()) == (200, digest)


def manifest_requests(upstream: Upstream, since: int, references) -> tuple[list, list]:
    asked = [line for line in upstream.access_log()[since:]
             if "/manifests/" in line.path and line.path.rsplit("/", 1)[1] in references]
    return [line for line in asked if line.method == "HEAD"], [line for line in asked if line.method == "GET"]


def asked_by_each_replica(cluster: Cluster, name: str) -> list[int]:
    return [replica.index for replica in cluster.replicas
            if replica.pull_records_until(lambda records: any(r["repository"] == name for r in records), timeout=5)]


def cold_pulls_over_the_replicas(cluster: Cluster, tmp_path, name: str) -> None:
    """8 concurrent cold pulls of a multi-arch tag through the balancer: every one gets the right
    digest; at most one HEAD and one GET upstream per manifest for them all."""
    image = build_multiarch_image(tmp_path / "image", name, "1.0", ["amd64", "arm64"])
    for platform in image.platforms.values():
        cluster.upstream.push(platform)
    push_index(image, cluster.upstream.url)
    amd64 = image.platforms["amd64"]
    since = len(cluster.upstream.access_log())
    results = at_once(8, lambda i: pulled_digest(cluster, image.reference, tmp_path / f"pulled-{i}"))
    assert results == [(0, "", amd64.manifest_digest)] * 8
    assert asked_by_each_replica(cluster, image.name) == [0, 1, 2]
    for references in ((image.tag, image.index_digest), (amd64.manifest_digest,)):
        heads, gets = manifest_requests(cluster.upstream, since, references)
        assert len(heads) <= 1 and len(gets) <= 1, (references, heads, gets)


def test_tag_gets_over_the_replicas_ask_upstream_nothing_within_the_ttl_and_once_after(cluster, tmp_path):
    # A replica asks the upstream for its challenge (`GET /v2/`) with its first request there, as
    # every replica in service has done: each one's, with an image of its own, before counting.
    for replica in cluster.replicas:
        own = build_image(tmp_path / f"own-{replica.index}", f"library/own-{replica.index}", [("etc/content", b"own")])
        cluster.upstream.push(own)
        pull_from(replica.address, own)
    image = build_image(tmp_path / "image", "library/shared-tag", [("etc/content", b"shared tag")])
    cluster.upstream.push(image)
    pull_from(cluster.replicas[0].address, image)
    since = len(cluster.upstream.access_log())
    answers = [manifest("127.0.0.1", image.name, image.tag) for _ in range(50)]
    assert {(status, headers["Docker-Content-Digest"]) for status, headers, _ in answers} == {(200, image.manifest_digest)}
    assert asked_by_each_replica(cluster, image.name) == [0, 1, 2]
    assert cluster.upstream.access_log()[since:] == [], "a tag learnt by one replica is fresh on the others"
    time.sleep(TTL + 0.5)
    since = len(cluster.upstream.access_log())
    answers = at_once(50, lambda _: manifest("127.0.0.1", image.name, image.tag))
    assert {(status, headers["Docker-Content-Digest"]) for status, headers, _ in answers} == {(200, image.manifest_digest)}
    asked = [(line.method, line.path) for line in cluster.upstream.access_log()[since:]]
    assert asked == [("HEAD", f"/v2/{image.name}/manifests/{image.tag}")], "one revalidation for the cluster"


def test_concurrent_cold_pulls_over_the_replicas_make_one_upstream_request_per_manifest(cluster, tmp_path):
    cold_pulls_over_the_replicas(cluster, tmp_path, "library/rollout")


def upstream_changes_said(replica, since: int) -> list[str]:
    """The replica's warning lines about its upstream since line `since`: one per change of its state."""
    return [line for line in replica.output[since:] if "upstream http://" in line]


def test_an_upstream_found_down_by_one_replica_is_down_on_all_and_back_likewise(cluster):
    """Replica 0 finds the upstream gone (a cold manifest its cache must fetch); the others are
    told, skip it, check it with one probe each (no pull), find it down too and say so once; a
    probe's answer brings it back on all."""
    lines_before = [len(replica.output) for replica in cluster.replicas]

    def upstream_states() -> list[str]:
        return [json.loads(replica.admin("/ready")[2])["upstreams"]["docker.io"] for replica in cluster.replicas]

    cluster.upstream.stop()
    try:
        status, _, _ = manifest(cluster.replicas[0].address, "library/unseen", "1.0")
        assert status == 503
        assert poll(upstream_states, lambda states: all(s.startswith("down") for s in states)) == ["down: refused"] * 3
    finally:
        cluster.upstream.start()
    assert poll(upstream_states, lambda states: states == ["up"] * 3, timeout=30) == ["up"] * 3
    for replica, before in zip(cluster.replicas, lines_before):
        said = upstream_changes_said(replica, before)
        assert ["unreachable" in line for line in said] == [True, False], said  # once down, once back
        asked = [r for r in replica.pull_records() if r["repository"] == "library/unseen"]
        assert len(asked) == (1 if replica.index == 0 else 0)


def test_an_upstream_unreachable_from_one_replica_alone_is_down_there_and_nothing_flaps(cluster, tmp_path):
    """Replica 0's own route to the upstream is cut (the others' is not): it finds the upstream
    down and serves what the cache holds; the others are told, check with a probe of their own,
    and keep pulling new images from the upstream, turn after turn. Each replica
    changes state only where it must: replica 0 down once and back once, the others never."""
    cut, others = cluster.replicas[0], cluster.replicas[1:]
    before = build_image(tmp_path / "before", "library/before-cut", [("etc/content", b"before")])
    cluster.upstream.push(before)
    pull_from(others[0].address, before)
    lines_before = [len(replica.output) for replica in cluster.replicas]

    def upstream_states() -> list[str]:
        return [json.loads(replica.admin("/ready")[2])["upstreams"]["docker.io"] for replica in cluster.replicas]

    with cut.cut_from(cluster.upstream.host, cluster.upstream.port):
        status, _, _ = manifest(cut.address, "library/unseen-from-the-cut-one", "1.0")
        assert status == 503
        assert poll(upstream_states, lambda states: states[0].startswith("down") and states[1:] == ["up", "up"])[1:] == ["up", "up"]
        for turn in range(3):  # over two of replica 0's probes (every 5 s), each failing
            image = build_image(tmp_path / f"turn-{turn}", "library/while-cut", [("etc/content", f"turn {turn}".encode())],
                                tag=f"turn-{turn}")
            cluster.upstream.push(image)
            time.sleep(TTL + 0.5)
            for replica in others:
                pull_from(replica.address, image)  # cold: from the upstream, every digest checked
            pull_from(cut.address, before)  # what the cache holds, served where the upstream is down
            states = upstream_states()
            assert states[0].startswith("down") and states[1:] == ["up", "up"], (turn, states)
        cut_said = upstream_changes_said(cut, lines_before[0])
        assert ["unreachable" in line for line in cut_said] == [True], cut_said
    assert poll(upstream_states, lambda states: states == ["up"] * 3, timeout=30) == ["up"] * 3
    for replica, since in zip(cluster.replicas, lines_before):
        said = upstream_changes_said(replica, since)
        assert ["unreachable" in line for line in said] == ([True, False] if replica is cut else []), (replica.index, said)


@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_redis_gone_under_load_fails_no_pull_is_said_once_and_sharing_resumes_when_it_is_back(cluster, tmp_path, outage):
    """Killed: connections refused. Paused (SIGSTOP): it accepts connections and answers nothing,
    so the call that finds it so waits REGCACHE_REDIS_TIMEOUT, and no other call does."""
    image = build_image(tmp_path / "image", f"library/redis-{outage}", [("etc/content", outage.encode())])
    cluster.upstream.push(image)
    assert pulled_digest(cluster, image.reference, tmp_path / "warm")[0] == 0
    lines_before = [len(replica.output) for replica in cluster.replicas]

    def pull_while(index: int) -> list:
        got = []
        for round_ in range(6):
            got.append(pulled_digest(cluster, image.reference, tmp_path / f"load-{index}-{round_}"))
            got.append(manifest("127.0.0.1", image.name, image.tag)[0])
            if index == 0 and round_ == 1:
                cluster.redis.kill() if outage == "killed" else cluster.redis.pause()
        return got

    try:
        results = at_once(4, pull_while)
        assert {r for got in results for r in got} == {(0, "", image.manifest_digest), 200}, "no pull failed"
        for replica in cluster.replicas:
            shared_state = poll(lambda: json.loads(replica.admin("/ready")[2])["shared_state"], lambda state: state.startswith("down"))
            assert shared_state.startswith("down"), (replica.index, shared_state)
    finally:
        if cluster.redis.process is None:  # killed
            cluster.redis.start()
        else:
            cluster.redis.resume()
    for replica in cluster.replicas:
        shared_state = poll(lambda: json.loads(replica.admin("/ready")[2])["shared_state"], lambda state: state == "ok", timeout=30)
        assert shared_state == "ok", (replica.index, shared_state)
    for replica, before in zip(cluster.replicas, lines_before):
        said = [line for line in replica.output[before:] if "shared state" in line]
        assert [REDIS_DOWN in line for line in said] == [True, False], said  # once down, once back
    cold_pulls_over_the_replicas(cluster, tmp_path, f"library/after-redis-{outage}")


def test_the_budget_evicts_what_the_cluster_pulled_least_recently_from_the_shared_storage(cluster, tmp_path):
    """p is pulled through replica 0, q through replica 1, r through replica 0; then p again
    through 1 and q through 0, and w through 2 pushes the storage past the budget. By the
    cluster's pulls r goes; by any replica's own, p or q would (or none, on replica 2)."""
    storage = cluster.storage / "dockerhub"
    images = {}
    for name in "pqrw":
        images[name] = build_image(tmp_path / name, f"library/budget-{name}", [("layer.bin", 11 << 20)])
        cluster.upstream.push(images[name])

    def held(name: str) -> bool:
        return cache_holds(storage, images[name].blob_digests[-1], timeout=0)

    pulled = {}
    for name, replica in (("p", 0), ("q", 1), ("r", 0), ("p", 1), ("q", 0), ("w", 2)):
        pulled[name, replica] = time.time()
        pull_from(cluster.replicas[replica].address, images[name])
        assert poll(lambda: held(name), bool, timeout=30)
    assert poll(lambda: storage_bytes(storage), lambda used: used <= BUDGET, timeout=60, every=0.5) <= BUDGET
    evicted = poll(lambda: [(replica.index, line) for replica in cluster.replicas for line in replica.output
                            if "disk budget: evicted" in line], bool)
    assert [held(name) for name in "pqrw"] == [True, True, False, True], ("r was the cluster's least recently pulled", evicted)
    # `regcache cache ls` on replica 0 says when p was last pulled: through replica 1
    ls = json.loads(cluster.replicas[0].command("cache", "ls", "--json").stdout)
    [p] = [r for r in ls["caches"][0]["repositories"] if r["repository"] == images["p"].name]
    [tag] = p["tags"]
    assert datetime.fromisoformat(tag["last_pulled"]).timestamp() >= int(pulled["p", 1])


def test_the_budget_never_evicts_a_blob_another_replica_sends_and_a_dead_replicas_sends_expire(cluster, tmp_path):
    """Replica 1's data plane sends x's 24 MiB layer to a slow client while pulls through replica 0
    push the shared storage past the budget with x the least recently pulled: x stays (a newer
    blob goes instead), and the client gets every byte. Once that read ended and newer pulls
    came, x goes. Then replica 1 is SIGKILLed while it sends k: its registration expires by
    itself and k goes too."""
    storage = cluster.storage / "dockerhub"
    images = {}
    for name, size in (("x", 24 << 20), ("y", 11 << 20), ("z", 11 << 20), ("u", 11 << 20), ("v", 11 << 20),
                       ("k", 24 << 20), ("m", 11 << 20), ("n", 11 << 20)):
        images[name] = build_image(tmp_path / name, f"library/reads-{name}", [("layer.bin", size)])
        cluster.upstream.push(images[name])
    a, b = cluster.replicas[0], cluster.replicas[1]

    def layer(name: str) -> str:
        return images[name].blob_digests[-1]

    def held(name: str) -> bool:
        return cache_holds(storage, layer(name), timeout=0)

    def pull(name: str, replica) -> None:
        pull_from(replica.address, images[name])
        assert poll(lambda: held(name), bool, timeout=30)

    def evictions() -> int:
        return sum("disk budget: evicted" in line for replica in cluster.replicas for line in replica.output)

    pull("x", b)
    reader = SlowReader(b.address, PORT, images["x"], layer("x"))
    try:
        assert poll(lambda: cluster.reads_registered(layer("x")), bool)
        before = evictions()
        for name in "yz":  # whatever was stored before goes first; then x (24 MiB) or y must go too
            pull(name, a)
        assert poll(lambda: storage_bytes(storage), lambda used: used <= BUDGET, timeout=60, every=0.5) <= BUDGET
        assert poll(evictions, lambda count: count > before) > before  # the line may come just after
        assert [held(name) for name in "xyz"] == [True, False, True], "y went, not x, which replica 1 was sending"
        assert reader.read_to_the_end() == layer("x")
    finally:
        reader.close()
    assert not poll(lambda: cluster.reads_registered(layer("x")), lambda registered: not registered)
    for name in "uv":  # now x, read last before them, is the least recently pulled: it goes
        pull(name, a)
    assert poll(lambda: held("x"), lambda holds: not holds, timeout=60, every=0.5) is False

    pull("k", b)
    reader = SlowReader(b.address, PORT, images["k"], layer("k"))
    try:
        assert poll(lambda: cluster.reads_registered(layer("k")), bool)
        b.kill()
        # Its send renews no more: within READ_TTL (6 s) it is counted no more, and k goes.
        assert not poll(lambda: cluster.reads_registered(layer("k")), lambda registered: not registered, timeout=30)
        for name in "mn":
            pull(name, a)
        assert poll(lambda: held("k"), lambda holds: not holds, timeout=60, every=0.5) is False
    finally:
        reader.close()
