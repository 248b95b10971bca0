"""Replicas as one cache of cold blobs (cluster/blob_flights.py), on the cluster test bed
(tests/support/cluster.py): three `regcache up` in network namespaces of their own behind
HAProxy, one Redis, one shared storage, the upstream behind a slow link.

Cold pulls spread over the replicas make one upstream GET per blob; a replica SIGKILLed while it
leads a download cuts its readers short (never a wrong byte), another replica takes over on a
retry, and then the replicas left serve the blob from the shared storage as a hit. What one
replica sends another is signed: it passes the client rules, and nothing unsigned does.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest

from regcache_core.config import DEFAULTS, parse_config
from regcache_core.dataplane.grants import GRANT_PATHS, GrantSigner, grant_key
from regcache_core.dataplane.server import BACKEND as DATAPLANE
from regcache_core.spool.table import SPOOL_DIR, spool_path
from tests.e2e.test_single_flight import layer_digest_in
from tests.support.clients import Containerd
from tests.support.cluster import DATAPLANE_OFFSET, GATEWAY, Cluster, Replica
from tests.support.fakes import SlowLink
from tests.support.parts import (
    PORT_BASES, UPSTREAM_OFFSET, at_once, blob_bytes, build_image, cache_holds, get_following_the_307, poll,
    raw_exchange, raw_request, skopeo, split_responses,
)

PORT = PORT_BASES["test_cluster_blobs"]
LINK_PORT = PORT + UPSTREAM_OFFSET + 1
RATE = 25e6  # bytes/s of the replicas' link to the upstream


@pytest.fixture(scope="module")
def link():
    """The replicas' upstream: the bed's behind a 25 MB/s link, so the big layer's download
    lasts seconds: time to kill its leader midway."""
    link = SlowLink(LINK_PORT, PORT + UPSTREAM_OFFSET, rate=RATE, host=GATEWAY, bind="").start()
    yield link
    link.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, images, link):
    """(the cluster, its images: a cold multi-layer one and the big one), the upstream behind
    `link`. Clients are the gateway's address only (HAProxy's and the test's): the replicas' own
    addresses are not among them."""
    tmp = tmp_path_factory.mktemp("cluster-blobs")
    cluster = Cluster(tmp / "bed", PORT, settings={"DOCKERHUB_UPSTREAM": link.url, "REGCACHE_CLIENTS": f"{GATEWAY}/32"})
    layers = build_image(tmp / "images", "library/layers", [("a.bin", 3 << 20), ("b.bin", 5 << 20), ("c.bin", 8 << 20)])
    with cluster:
        for image in (layers, images["big"]):
            cluster.upstream.push(image)
        yield cluster, {"layers": layers, "big": images["big"]}


def get_blob(replica: Replica, image, digest: str) -> tuple[int, dict[str, str], bytes]:
    """A client's GET of the blob at `replica`, following its 307."""
    return get_following_the_307(replica.port, f"/v2/{image.name}/blobs/{digest}", f"docker.io.regcache.test:{replica.port}",
                                 address=replica.address)


def digest_of(body: bytes) -> str:
    return f"sha256:{hashlib.sha256(body).hexdigest()}"


def upstream_gets(cluster: Cluster, digest: str) -> int:
    return len(cluster.upstream.requests_for(digest, "GET"))


def followers(replica: Replica) -> float:
    return sum(v for (name, _), v in replica.metrics().items() if name == "regcache_spool_followers_total")


def test_cold_pulls_spread_over_the_replicas_make_one_upstream_get_per_blob(world, tmp_path):
    """8 pulls at once: skopeo copies through HAProxy, and raw GETs at replica i % 3 each."""
    cluster, images = world
    image = images["layers"]

    def pull(index: int):
        if index % 2 == 0:
            return skopeo("copy", "--src-tls-verify=false", f"docker://{cluster.host}/{image.reference}",
                          f"oci:{tmp_path / f'pulled-{index}'}", timeout=180)
        replica = cluster.replicas[index % len(cluster.replicas)]
        return {digest: get_blob(replica, image, digest) for digest in image.blob_digests}

    results = at_once(8, pull)
    for index, result in enumerate(results):
        if index % 2 == 0:
            assert result.returncode == 0, result.stderr
            for digest in image.blob_digests:
                assert layer_digest_in(tmp_path / f"pulled-{index}", digest) == digest
        else:
            for digest, (status, headers, body) in result.items():
                assert (status, digest_of(body)) == (200, digest), (index, digest, status, headers)
    for digest in image.blob_digests:
        assert upstream_gets(cluster, digest) == 1, f"{digest[:19]}: {cluster.upstream.requests_for(digest)}"
        assert cache_holds(cluster.storage / "dockerhub", digest, timeout=60), "stored in the shared storage"
    # Every replica serves them warm now, from the shared storage: hits, no upstream request.
    for replica in cluster.replicas:
        before = len(replica.pull_records())
        for digest in image.blob_digests:
            status, _, body = get_blob(replica, image, digest)
            assert (status, digest_of(body)) == (200, digest)
        records = replica.pull_records_until(lambda rs: sum(r["status"] == 200 for r in rs[before:]) == len(image.blob_digests))
        assert [r["cache"] for r in records[before:] if r["status"] == 200] == ["hit"] * len(image.blob_digests)
    for digest in image.blob_digests:
        assert upstream_gets(cluster, digest) == 1


def test_containerd_and_skopeo_pulling_one_cold_image_at_once_make_one_upstream_get_per_blob(world, tmp_path):
    """containerd, with a hosts.toml listing the three replicas (the first answers, the 307s lead
    to whichever replica leads each blob), and seven skopeo copies through HAProxy, at once."""
    cluster, _ = world
    image = build_image(tmp_path / "image", "library/mixed", [("a.bin", 2 << 20), ("b.bin", 6 << 20)])
    cluster.upstream.push(image)
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "docker.io").mkdir(parents=True)
    (hosts_dir / "docker.io/hosts.toml").write_text(f'server = "{cluster.upstream.url}"\n' + "".join(
        f'[host."http://{replica.address}:{replica.port}"]\n  capabilities = ["pull", "resolve"]\n'
        for replica in cluster.replicas))
    containerd = Containerd(tmp_path / "containerd").start()
    try:
        def pull(index: int):
            if index == 0:
                return containerd.pull(f"docker.io/{image.reference}", hosts_dir)
            return skopeo("copy", "--src-tls-verify=false", f"docker://{cluster.host}/{image.reference}",
                          f"oci:{tmp_path / f'pulled-{index}'}", timeout=180)

        results = at_once(8, pull)
        assert all(result.returncode == 0 for result in results), [r.stderr for r in results if r.returncode]
        assert containerd.image_digest(f"docker.io/{image.reference}") == image.manifest_digest
        assert containerd.unpacked(f"docker.io/{image.reference}")
    finally:
        containerd.stop()
    for index in range(1, 8):
        for digest in image.blob_digests:
            assert layer_digest_in(tmp_path / f"pulled-{index}", digest) == digest
    for digest in image.blob_digests:
        assert upstream_gets(cluster, digest) == 1, f"{digest[:19]}: {cluster.upstream.requests_for(digest)}"


def test_a_peers_signed_request_passes_the_client_rules_an_unsigned_one_never(world, tmp_path):
    """A replica's cache that another replica sends to the leader's spool fetches it from its own
    address, which is not among REGCACHE_CLIENTS: the grant, signed with the key derived from the
    shared secret, lets it through; nothing without that signature gets a byte; and the clients'
    route applies the client rules to a replica's address as to any."""
    cluster, _ = world
    leader, peer = cluster.replicas[1], cluster.replicas[2]
    body = os.urandom(300_000)
    key = ("docker.io", "library/peer", digest_of(body))
    path = spool_path(leader.data_dir / SPOOL_DIR, key)
    path.write_bytes(body)
    os.chmod(path, 0o400)  # sealed: every byte there and checked, as the leader's download leaves it
    try:
        signer = GrantSigner(grant_key(parse_config({**DEFAULTS, **peer.settings})))  # as the peer signs
        base = f"http://{leader.address}:{PORT + DATAPLANE_OFFSET}"

        def fetch_from_peer(kind: str, query: str) -> tuple[str, bytes]:
            """curl where the peer runs: (status, body)."""
            received = tmp_path / "received"
            result = peer.run("curl", "-s", "-o", str(received), "-w", "%{http_code}", f"{base}{GRANT_PATHS[kind]}?{query}")
            return result.stdout, received.read_bytes()

        spool_grant = signer.query(signer.grant("spool", *key, len(body)))
        status, received = fetch_from_peer("spool", spool_grant)
        assert (status, received == body) == ("200", True)
        forged = GrantSigner(b"x" * 32)
        for refused in (spool_grant.rsplit("&sig=", 1)[0], forged.query(forged.grant("spool", *key, len(body)))):
            assert fetch_from_peer("spool", refused)[0] == "403"
        status, said = fetch_from_peer("cold", signer.query(signer.grant("cold", *key, len(body))))
        assert status == "403" and b"not in the networks allowed" in said
    finally:
        path.unlink()


def test_a_cold_blob_head_on_each_replica_makes_one_upstream_head(world, tmp_path):
    """The first replica's HEAD goes upstream; its 200 is shared through Redis, and answers the
    others' (no download either)."""
    cluster, _ = world
    image = build_image(tmp_path, "library/heads", [("h.bin", 1 << 20)])
    cluster.upstream.push(image)
    layer = image.blob_digests[-1]
    heads_before = len(cluster.upstream.requests_for(layer, "HEAD"))  # the push's own
    for replica in cluster.replicas:
        request = raw_request(f"HEAD /v2/{image.name}/blobs/{layer} HTTP/1.1", host=f"docker.io.regcache.test:{PORT}")
        [(status, headers, _)] = split_responses(raw_exchange(PORT, request, address=replica.address), ["HEAD"])
        assert (status, headers["docker-content-digest"]) == (200, layer), replica.index
    assert len(cluster.upstream.requests_for(layer, "HEAD")) - heads_before == 1
    assert upstream_gets(cluster, layer) == 0


def test_with_redis_down_every_pull_completes_and_back_it_is_one_get_per_blob_again(world, tmp_path):
    cluster, _ = world
    alone = build_image(tmp_path, "library/alone", [("a.bin", 2 << 20), ("b.bin", 3 << 20)])
    together = build_image(tmp_path, "library/together", [("a.bin", 2 << 20), ("b.bin", 3 << 20)])
    for image in (alone, together):
        cluster.upstream.push(image)

    def pull_on_every_replica(image) -> None:
        results = at_once(len(cluster.replicas), lambda i: {
            digest: get_blob(cluster.replicas[i], image, digest) for digest in image.blob_digests})
        for result in results:
            for digest, (status, _, body) in result.items():
                assert (status, digest_of(body)) == (200, digest)

    def shared_state() -> list[str]:
        return [json.loads(replica.admin("/ready")[2])["shared_state"] for replica in cluster.replicas]

    cluster.redis.kill()
    try:
        pull_on_every_replica(alone)  # each replica on its own: no pull fails
        for digest in alone.blob_digests:
            assert 1 <= upstream_gets(cluster, digest) <= len(cluster.replicas)
        assert all(state.startswith("down") for state in shared_state())
    finally:
        cluster.redis.start()
    states = poll(shared_state, lambda states: states == ["ok"] * len(cluster.replicas), timeout=30)
    assert states == ["ok"] * len(cluster.replicas)
    pull_on_every_replica(together)
    for digest in together.blob_digests:
        assert upstream_gets(cluster, digest) == 1, "cluster-wide again"


def test_a_leader_killed_midway_cuts_its_readers_and_another_replica_takes_over(world, link):
    cluster, images = world
    image = images["big"]
    layer = image.blob_digests[-1]
    whole = blob_bytes(cluster.upstream, layer)
    leader, others = cluster.replicas[0], cluster.replicas[1:]
    answers: dict[int, tuple] = {}

    def get(replica: Replica) -> None:
        answers[replica.index] = get_blob(replica, image, layer)

    first = threading.Thread(target=get, args=(leader,))
    first.start()
    spools = leader.data_dir / SPOOL_DIR
    started = poll(lambda: [f.stat().st_size for f in spools.iterdir()], lambda sizes: any(s > 10 << 20 for s in sizes),
                   timeout=60)
    assert started, "replica 0 never spooled the layer"
    # Halfway it stays, until the kill, however long the others take to join under load (at 25
    # MB/s the rest took 3.6 s); a trickle rather than a stop: a body with no byte for 30 s fails.
    link.rate = 256e3
    readers = [threading.Thread(target=get, args=(replica,)) for replica in others]
    for reader in readers:
        reader.start()
    # Each of the others sent its client to replica 0's spool (its follower counter) to read it.
    counts = poll(lambda: [followers(replica) for replica in others], all, timeout=30)
    assert all(counts), counts
    time.sleep(0.5)  # their first bytes
    sizes = [f.stat().st_size for f in spools.iterdir()]
    assert all(size < len(whole) - (10 << 20) for size in sizes), f"the download ended before the kill: {sizes}"
    leader.kill()
    link.rate = RATE  # for the successor's download
    for thread in (first, *readers):
        thread.join(60)
    for index, (status, headers, body) in answers.items():  # every reader cut short, never a wrong byte
        assert (status, headers["content-length"]) == (200, str(len(whole))), index
        assert len(body) < len(whole) and body == whole[:len(body)], index

    def retry() -> tuple:
        """A client's retry: the dead leader's data plane is unreachable until its lease expires
        and another replica takes the blob over."""
        try:
            return get_blob(others[0], image, layer)
        except OSError as e:
            return None, {}, repr(e).encode()

    status, _, body = poll(retry, lambda answer: answer[0] == 200 and len(answer[2]) == len(whole), timeout=90, every=1)
    assert (status, digest_of(body)) == (200, layer)
    assert upstream_gets(cluster, layer) == 2, "the dead leader's download and its successor's"
    assert cache_holds(cluster.storage / "dockerhub", layer, timeout=60)
    # The replica left that did not download it serves it as a hit, without the upstream.
    last = others[1]
    before = len(last.pull_records())
    status, _, body = get_blob(last, image, layer)
    assert (status, digest_of(body)) == (200, layer)
    records = last.pull_records_until(lambda rs: any(r["backend"] == DATAPLANE for r in rs[before:]))
    assert [r["cache"] for r in records[before:] if r["status"] == 200] == ["hit"], records[before:]
    assert upstream_gets(cluster, layer) == 2
