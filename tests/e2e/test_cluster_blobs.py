"""End to end: three `regcache up` replicas as one cache of cold blobs (cluster/blob_flights.py).

Three whole stacks on loopback (ports of their own, data dirs of their own, each its own
REGCACHE_DATAPLANE_URL), one redis-server, one upstream registry behind a slow link, and one
storage directory all three caches use (DOCKERHUB_STORAGE). Cold pulls spread over the replicas
make one upstream GET per blob; a replica SIGKILLed while it leads a download cuts its readers
short (never a wrong byte), another replica takes over on a retry, and then every replica left
serves the blob from the shared storage.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from regcache_core.config import DEFAULTS, parse_config
from regcache_core.dataplane.grants import GRANT_PATHS, GrantSigner, grant_key
from regcache_core.dataplane.server import BACKEND as DATAPLANE
from regcache_core.spool.table import SPOOL_DIR, spool_path
from tests.e2e.test_single_flight import layer_digest_in
from tests.support.fakes import SlowLink
from tests.support.parts import (
    PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Stack, Upstream, at_once, blob_bytes, build_image, cache_holds,
    child_pids, docker_io_stack, get_following_the_307, has_exited, poll, raw_exchange, raw_request, skopeo,
    split_responses,
)
from tests.support.redis_server import RedisServer

PORT = PORT_BASES["test_cluster_blobs"]
REPLICAS = 3
SECRET = "cluster-test-secret-0123456789abcdef"


def replica_port(index: int) -> int:
    """Replica i serves on PORT + 2i, its cache on the next port; its data plane, admin and
    egress ports are 50, 70 and 80 above (Stack's)."""
    return PORT + 2 * index


def host(index: int) -> str:
    return f"docker.io.{TEST_DOMAIN}:{replica_port(index)}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(upstream, its slow link, the replicas, their shared storage, images)."""
    tmp = tmp_path_factory.mktemp("cluster")
    images = {
        "layers": build_image(tmp / "images", "library/layers", [("a.bin", 3 << 20), ("b.bin", 5 << 20),
                                                                  ("c.bin", 8 << 20)]),
        "huge": build_image(tmp / "images", "library/huge", [("huge.bin", 100 << 20)]),
    }
    upstream = Upstream(tmp / "upstream", PORT + UPSTREAM_OFFSET).start()
    for image in images.values():
        upstream.push(image)
    # 25 MB/s: the big layer's download lasts seconds, time to kill its leader midway.
    link = SlowLink(PORT + UPSTREAM_OFFSET + 1, upstream.port, rate=25e6).start()
    redis = RedisServer(tmp / "redis", PORT + UPSTREAM_OFFSET + 2).start()
    shared = tmp / "shared-storage"
    replicas = []
    try:
        for i in range(REPLICAS):
            port = replica_port(i)
            # Where `regcache up` writes the cache's config.yml: it makes it only with the storage
            # beneath it, and this storage is elsewhere (the shared one).
            (tmp / f"replica-{i}" / "data" / "dockerhub").mkdir(parents=True)
            replicas.append(docker_io_stack(tmp / f"replica-{i}", upstream, port, {
                "DOCKERHUB_UPSTREAM": link.url,
                "DOCKERHUB_STORAGE": str(shared),
                "REGCACHE_REDIS_URL": redis.url,
                "REGCACHE_CLUSTER_SECRET": SECRET,
                "REGCACHE_DATAPLANE_URL": f"http://127.0.0.1:{port + 50}",
                # The test's clients come from 127.0.0.1; 127.0.0.3 stands for another replica's address.
                "REGCACHE_CLIENTS": "127.0.0.1/32",
            }).start())
        yield upstream, link, replicas, shared, images
    finally:
        for stack in replicas:
            stack.stop()
        redis.stop()
        link.stop()
        upstream.stop()


def gets_of(upstream: Upstream, digest: str) -> int:
    return len(upstream.requests_for(digest, "GET"))


def digest_of(body: bytes) -> str:
    return f"sha256:{hashlib.sha256(body).hexdigest()}"


def test_cold_pulls_spread_over_the_replicas_make_one_upstream_get_per_blob(cluster, tmp_path):
    """8 pulls at once, replica i % 3 each: skopeo copies and raw GETs following the 307s."""
    upstream, _, replicas, shared, images = cluster
    image = images["layers"]

    def pull(index: int):
        replica = index % REPLICAS
        if index % 2 == 0:
            return skopeo("copy", "--src-tls-verify=false", f"docker://{host(replica)}/{image.reference}",
                          f"oci:{tmp_path / f'pulled-{index}'}", timeout=180)
        return {digest: get_following_the_307(replica_port(replica), f"/v2/{image.name}/blobs/{digest}",
                                              host(replica)) for digest in image.blob_digests}

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
        assert gets_of(upstream, digest) == 1, f"{digest[:19]}: {upstream.requests_for(digest)}"
        assert cache_holds(shared, digest, timeout=60), "the leader's cache stored it in the shared storage"
    # Every replica serves them warm now, from the shared storage: no upstream request.
    for index, replica in enumerate(replicas):
        before = len(replica.pull_records())
        for digest in image.blob_digests:
            status, _, body = get_following_the_307(replica_port(index), f"/v2/{image.name}/blobs/{digest}",
                                                    host(index))
            assert (status, digest_of(body)) == (200, digest)
        records = replica.pull_records_until(lambda rs: sum(r["method"] == "GET" and r["status"] == 200
                                                            for r in rs[before:]) == len(image.blob_digests))
        assert {r["cache"] for r in records[before:] if r["status"] == 200} == {"hit"}, records[before:]
    for digest in image.blob_digests:
        assert gets_of(upstream, digest) == 1


def test_a_peers_signed_request_passes_the_client_rules_an_unsigned_one_never(cluster):
    """What a replica's cache fetches from another replica's data plane (a spool of a blob that one
    downloads) is signed with the key derived from the shared secret: it passes REGCACHE_CLIENTS,
    which the peer's address is not in; without that signature it gets nothing; and the client
    routes still apply the client rules."""
    _, _, replicas, _, _ = cluster
    body = os.urandom(300_000)
    digest = digest_of(body)
    key = ("docker.io", "library/peer", digest)
    path = spool_path(replicas[1].data_dir / SPOOL_DIR, key)
    path.write_bytes(body)
    os.chmod(path, 0o400)  # sealed: every byte there and checked
    try:
        # Signed as replica 2 signs (it never saw replica 1's data dir).
        signer = GrantSigner(grant_key(parse_config({**DEFAULTS, **replicas[2].settings})))
        dataplane = replica_port(1) + 50

        def get(kind: str, query: str) -> tuple:
            reply = raw_exchange(dataplane, raw_request(f"GET {GRANT_PATHS[kind]}?{query} HTTP/1.1",
                                                        host=f"127.0.0.1:{dataplane}"), source="127.0.0.3")
            [answer] = split_responses(reply, ["GET"])
            return answer

        query = signer.query(signer.grant("spool", *key, len(body)))
        status, _, received = get("spool", query)
        assert (status, received == body) == (200, True)
        unsigned = query.rsplit("&sig=", 1)[0]
        forged = GrantSigner(b"x" * 32).query(GrantSigner(b"x" * 32).grant("spool", *key, len(body)))
        for refused in (unsigned, forged):
            assert get("spool", refused)[0] == 403
        cold = signer.query(signer.grant("cold", *key, len(body)))
        status, _, received = get("cold", cold)  # a client's route: client rules apply
        assert status == 403 and b"not in the networks allowed" in received
    finally:
        path.unlink()


def kill_replica(stack: Stack) -> None:
    """SIGKILL `regcache up` and everything it runs, as a node that goes away."""
    children = child_pids(stack.process.pid)
    stack.process.kill()
    stack.process.wait(10)
    for pid in children:  # they die with it (parent-death signal): wait until their sockets are gone
        assert poll(lambda: has_exited(pid), bool, 10), f"child {pid} outlived regcache up"


def test_a_leader_killed_midway_cuts_its_readers_and_another_replica_takes_over(cluster):
    upstream, _, replicas, shared, images = cluster
    image = images["huge"]
    layer = image.blob_digests[-1]
    path = f"/v2/{image.name}/blobs/{layer}"
    whole = blob_bytes(upstream, layer)
    leader, others = replicas[0], [1, 2]
    answers: dict[int, tuple] = {}

    def get(index: int) -> None:
        answers[index] = get_following_the_307(replica_port(index), path, host(index))

    first = threading.Thread(target=get, args=(0,))
    first.start()
    spools = leader.data_dir / "spools"
    started = poll(lambda: [f.stat().st_size for f in spools.iterdir()], lambda sizes: any(s > 10 << 20 for s in sizes),
                   timeout=60)
    assert started, "replica 0 never spooled the layer"
    readers = [threading.Thread(target=get, args=(i,)) for i in others]
    for reader in readers:
        reader.start()
    # Each of the others sent its client to replica 0's spool (its follower counter), and reads it.
    followed = poll(lambda: [sum(v for (name, _), v in replicas[i].metrics().items()
                                 if name == "regcache_spool_followers_total") for i in others],
                    lambda counts: all(counts), timeout=30)
    assert all(followed), followed
    time.sleep(0.5)  # their first bytes
    sizes = [f.stat().st_size for f in spools.iterdir()]
    assert all(size < len(whole) - (10 << 20) for size in sizes), f"the download ended before the kill: {sizes}"
    kill_replica(leader)
    first.join(60)
    for reader in readers:
        reader.join(60)
    for index in (0, *others):  # every reader of the dead leader cut short, never a wrong byte
        status, headers, body = answers[index]
        assert (status, headers["content-length"]) == (200, str(len(whole)))
        assert len(body) < len(whole) and body == whole[:len(body)], index

    def retry() -> tuple:
        """A client's retry: the dead leader's data plane refuses connections until its lease
        expires and another replica takes the blob over."""
        try:
            return get_following_the_307(replica_port(1), path, host(1))
        except OSError as e:
            return None, {}, repr(e).encode()

    status, _, body = poll(retry, lambda answer: answer[0] == 200 and len(answer[2]) == len(whole), timeout=90,
                           every=1)
    assert (status, digest_of(body)) == (200, layer)
    assert gets_of(upstream, layer) == 2, "the dead leader's download and its successor's"
    assert cache_holds(shared, layer, timeout=60)
    # The replica left that did not download it serves it as a hit, with no upstream request.
    before = len(replicas[2].pull_records())
    status, _, body = get_following_the_307(replica_port(2), path, host(2))
    assert (status, digest_of(body)) == (200, layer)
    records = replicas[2].pull_records_until(lambda rs: any(r["backend"] == DATAPLANE and r["status"] == 200
                                                            for r in rs[before:]))
    assert [r["cache"] for r in records[before:] if r["status"] == 200] == ["hit"], records[before:]
    assert gets_of(upstream, layer) == 2
