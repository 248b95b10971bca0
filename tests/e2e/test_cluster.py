"""Replicas as one cache (issue 19), on the cluster test bed of tests/support/cluster.py: three
`regcache up` in network namespaces of their own behind HAProxy, one upstream, one Redis.

First the bed itself: every replica in its own namespace and reachable only on its bridge
address, the balancer spreading connections and following readiness, a replica SIGKILLed and
started again, and nothing left behind (processes, namespaces, interfaces) when it is stopped.

Then what needs no shared state: the replicas' caches on one storage directory (an image
pulled through one is warm on the others; registry:2's own expiry deletes nothing there).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.clients import Containerd

from tests.support.cluster import GATEWAY, Cluster
from tests.support.parts import (
    MANIFEST_TYPES, PORT_BASES, accepts_connections, build_image, cache_holds, poll, pull, raw_exchange, raw_request,
    Stack, split_responses,
)

PORT = PORT_BASES["test_cluster"]
REGIONAL_A, REGIONAL_B = PORT + 100, PORT + 105  # regional caches' stacks in the gateway: 5 apart, no port of one is the other's


def network_namespaces_of_processes() -> set[str]:
    namespaces = set()
    for entry in os.scandir("/proc"):
        try:
            namespaces.add(os.readlink(f"/proc/{entry.name}/ns/net"))
        except OSError:
            continue
    return namespaces


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, images):
    # A budget, as replicas on shared storage should have: their registry:2s then never delete.
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), PORT, settings={"REGCACHE_MAX_DISK": "10G"})
    with cluster:
        cluster.upstream.push(images["small"])
        namespaces = {namespace.identity for namespace in cluster.namespaces}
        yield cluster
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "br0" not in links and "rc-veth" not in links, links
    assert not namespaces & network_namespaces_of_processes(), "a process still runs in a replica's namespace"


def manifest_through_balancer(image) -> tuple[int, dict[str, str], bytes]:
    """One manifest GET on a connection of its own, through HAProxy."""
    request = raw_request(f"GET /v2/{image.name}/manifests/{image.tag} HTTP/1.1", f"Accept: {MANIFEST_TYPES}",
                          host=f"docker.io.regcache.test:{PORT}")
    [answer] = split_responses(raw_exchange(PORT, request), ["GET"])
    return answer


def test_each_replica_runs_in_a_namespace_of_its_own(cluster):
    for replica in cluster.replicas:
        status, _, body = replica.admin("/ready")
        assert status == 200 and json.loads(body)["shared_state"] == "ok", (body, replica.output[-20:])
        assert accepts_connections(PORT, replica.address)
        # Its hosts file names the suite's hosts at the gateway, where the balancer is.
        assert replica.run("getent", "hosts", "docker.io.regcache.test").stdout.split()[0] == GATEWAY
    # Its cache listens on a loopback of its own: not the gateway's.
    assert not accepts_connections(PORT + 1)


def test_the_balancer_spreads_connections_over_the_replicas(cluster, images):
    small = images["small"]
    answers = [manifest_through_balancer(small) for _ in cluster.replicas]
    assert [status for status, _, _ in answers] == [200] * len(cluster.replicas)
    asked = [replica.index for replica in cluster.replicas
             if replica.pull_records_until(lambda records: any(r["kind"] == "manifest" for r in records), timeout=5)]
    assert asked == [0, 1, 2]


def test_a_pull_through_the_balancer_follows_the_307s_to_the_replicas(cluster, images, tmp_path):
    small = images["small"]
    assert pull(cluster.host, small.reference, tmp_path / "pulled") == small.manifest_digest


def test_a_replica_killed_leaves_the_rotation_and_comes_back(cluster, images, tmp_path):
    small = images["small"]
    victim = cluster.replicas[0]
    victim.kill()
    assert victim.namespace.processes() == [] and victim.process.returncode == -9
    cluster.balancer.wait_for_rotation({1, 2})
    assert pull(cluster.host, small.reference, tmp_path / "without-0") == small.manifest_digest
    victim.start()
    cluster.balancer.wait_for_rotation({0, 1, 2})
    assert victim.admin("/ready")[0] == 200


def fresh_image(cluster, workdir, name: str):
    """An image of its own on the cluster's upstream, which no replica has seen."""
    image = build_image(workdir, f"library/{name}", [("etc/motd", os.urandom(3000)), ("big.bin", 1 << 20)])
    cluster.upstream.push(image)
    return image


def blob_gets(cluster, image) -> int:
    return sum(len(cluster.upstream.requests_for(f"/blobs/{digest}", "GET")) for digest in image.blob_digests)


def test_an_image_pulled_through_one_replica_is_warm_on_the_others(cluster, tmp_path):
    image = fresh_image(cluster, tmp_path, "shared")
    first, *others = cluster.replicas
    assert pull(cluster.host, image.reference, tmp_path / "first", enter=first.pinned) == image.manifest_digest
    fetched = blob_gets(cluster, image)
    assert fetched >= len(image.blob_digests)
    storage = cluster.storage / "dockerhub"
    assert all(cache_holds(storage, digest) for digest in image.blob_digests)
    for replica in others:
        before = len(replica.pull_records())
        assert pull(cluster.host, image.reference, tmp_path / f"from-{replica.index}", enter=replica.pinned) == image.manifest_digest
        records = replica.records_of_pull(image, before)
        assert {r["cache"] for r in records if r["kind"] == "blob" and r["method"] == "GET"} == {"hit"}, records
    assert blob_gets(cluster, image) == fetched, "a replica fetched a blob another had stored on the shared storage"


def test_registry_2_expiry_deletes_nothing_on_the_shared_storage(cluster, tmp_path):
    """registry:2 2.8 schedules what it stores to expire 7 days later, in scheduler-state.json
    on the storage, which it reads as it starts: an entry already due expires at once. Every
    replica's registry:2 rewrites that one file with the entries it made itself, so the test
    writes the image's entries, due long ago, while the replicas are stopped. Deleting is off
    (the replicas have a budget): the blobs stay, and the image is still warm."""
    image = fresh_image(cluster, tmp_path, "expiring")
    assert pull(cluster.host, image.reference, tmp_path / "first") == image.manifest_digest
    fetched = blob_gets(cluster, image)
    storage = cluster.storage / "dockerhub"
    assert all(cache_holds(storage, digest) for digest in image.blob_digests)
    for replica in cluster.replicas:
        assert replica.stop() == 0
    due = [(digest, 0) for digest in image.blob_digests] + [(image.manifest_digest, 1)]  # EntryType: 0 blob, 1 manifest
    (storage / "scheduler-state.json").write_text(json.dumps({
        f"{image.name}@{digest}": {"Key": f"{image.name}@{digest}", "ExpiryData": "2000-01-01T00:00:00Z", "EntryType": kind}
        for digest, kind in due}))
    cluster.start_replicas(range(len(cluster.replicas)))
    cluster.balancer.wait_for_rotation({0, 1, 2})

    def expiry_errors() -> str:
        return "".join(line for replica in cluster.replicas
                       for line in (replica.data_dir / "dockerhub" / "registry.log").read_text().splitlines(keepends=True)
                       if "Scheduler error returned from OnExpire" in line)

    errors = poll(expiry_errors, lambda text: all(digest in text for digest, _ in due), timeout=20)
    assert all(digest in errors for digest, _ in due), f"registry:2 did not expire the image: {errors}"
    assert all(cache_holds(storage, digest, timeout=0) for digest in image.blob_digests)
    assert pull(cluster.host, image.reference, tmp_path / "again") == image.manifest_digest
    assert blob_gets(cluster, image) == fetched


def regional_cache(workdir, port: int, central: str) -> Stack:
    """A regcache in the gateway whose docker.io upstream is the cluster (a central cache)."""
    return Stack(workdir, {
        "REGCACHE_PORT": str(port),
        "REGCACHE_REGISTRIES": "DOCKERHUB",
        "DOCKERHUB_UPSTREAM": f"http://{central}",
        "DOCKERHUB_CACHE": f"http://127.0.0.1:{port + 1}",
    })


def test_regional_caches_whose_upstream_is_the_central_cluster(cluster, tmp_path):
    """Two regional regcaches with the cluster as their upstream: the first's pull reaches the
    real upstream once per blob, the second's is served warm by the central cache, and a
    regional cache goes on serving what it holds while the central one is unreachable.
    The central cache's 307s (to its data plane, to a cold blob's spool) name a replica's
    address, which a regional cache follows like a CDN's."""
    image = fresh_image(cluster, tmp_path, "regional")
    first = regional_cache(tmp_path / "regional-a", REGIONAL_A, cluster.host).start()
    second = regional_cache(tmp_path / "regional-b", REGIONAL_B, cluster.host).start()
    try:
        via_first = f"docker.io.regcache.test:{REGIONAL_A}"
        assert pull(via_first, image.reference, tmp_path / "a") == image.manifest_digest
        assert {digest: len(cluster.upstream.requests_for(f"/blobs/{digest}", "GET")) for digest in image.blob_digests} == {
            digest: 1 for digest in image.blob_digests}
        assert all(cache_holds(cluster.storage / "dockerhub", digest) for digest in image.blob_digests)
        central_before = {replica.index: len(replica.pull_records()) for replica in cluster.replicas}
        assert pull(f"docker.io.regcache.test:{REGIONAL_B}", image.reference, tmp_path / "b") == image.manifest_digest
        assert blob_gets(cluster, image) == len(image.blob_digests)
        central = [r for replica in cluster.replicas for r in replica.pull_records()[central_before[replica.index]:]
                   if r["repository"] == image.name and r["kind"] == "blob" and r["method"] == "GET"]
        assert central and {r["cache"] for r in central} == {"hit"}, central
        cluster.balancer.stop()  # the central cache unreachable
        try:
            assert pull(via_first, image.reference, tmp_path / "a-alone") == image.manifest_digest
        finally:
            cluster.balancer.start()
            cluster.balancer.wait_for_rotation({0, 1, 2})
    finally:
        assert first.stop() == 0 and second.stop() == 0


def test_with_the_upstream_down_and_a_replica_down_the_other_two_serve_every_image_pulled_before(
        cluster, images, tmp_path):
    """Last in this module: it stops the upstream and kills replica 0 for good. skopeo pulls
    through the balancer; containerd with a hosts.toml listing the three replicas in order
    (the dead one first: it moves on to the next host) and the dead upstream as its server."""
    pulled = [images["small"], fresh_image(cluster, tmp_path, "before-a"), fresh_image(cluster, tmp_path, "before-b")]
    for image in pulled:
        assert pull(cluster.host, image.reference, tmp_path / f"before-{image.name.replace('/', '_')}") == image.manifest_digest
    # Stored by a replica's cache just after the pull (spool/cache_fill.py): a replica killed
    # before that never stores it.
    assert all(cache_holds(cluster.storage / "dockerhub", digest) for image in pulled for digest in image.blob_digests)
    cluster.upstream.stop()
    cluster.replicas[0].kill()
    cluster.balancer.wait_for_rotation({1, 2})
    before = {replica.index: len(replica.pull_records()) for replica in cluster.replicas[1:]}
    for attempt in range(2):  # twice: each connection of a pull may go to either replica
        for image in pulled:
            destination = tmp_path / f"after-{attempt}-{image.name.replace('/', '_')}"
            assert pull(cluster.host, image.reference, destination) == image.manifest_digest
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "docker.io").mkdir(parents=True)
    (hosts_dir / "docker.io/hosts.toml").write_text(f'server = "{cluster.upstream.url}"\n' + "".join(
        f'[host."http://{replica.address}:{PORT}"]\n  capabilities = ["pull", "resolve"]\n' for replica in cluster.replicas))
    containerd = Containerd(tmp_path / "containerd").start()
    try:
        for image in pulled:
            result = containerd.pull(f"docker.io/{image.reference}", hosts_dir)
            assert result.returncode == 0, result.stderr
            assert containerd.image_digest(f"docker.io/{image.reference}") == image.manifest_digest
            assert containerd.unpacked(f"docker.io/{image.reference}")
    finally:
        containerd.stop()
    served = {replica.index for replica in cluster.replicas[1:]
              if any(r["method"] == "GET" and r["status"] == 200 for r in replica.pull_records()[before[replica.index]:])}
    assert served == {1, 2}
