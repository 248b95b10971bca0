"""Replicas as one cache (issue 19), on the cluster test bed of tests/support/cluster.py: three
`regcache up` in network namespaces of their own behind HAProxy, one upstream, one Redis.

First the bed itself: every replica in its own namespace and reachable only on its bridge
address, the balancer spreading connections and following readiness, a replica SIGKILLed and
started again, and nothing left behind (processes, namespaces, interfaces) when it is stopped.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.cluster import GATEWAY, Cluster
from tests.support.parts import MANIFEST_TYPES, PORT_BASES, accepts_connections, pull, raw_exchange, raw_request, split_responses

PORT = PORT_BASES["test_cluster"]


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
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), PORT)
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
