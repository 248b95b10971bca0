"""Several replicas against one node, side by side in one run, on issue 19's cluster bed
(tests/support/cluster.py: replicas of `regcache up`, each in a network namespace of its own on a
bridge, one redis-server, HAProxy in front, one shared storage).

    sudo .venv/bin/python -m scripts.bench_cluster [--requests 100] [--rounds 2] [--size-mib 128] [--time-limit 900]

1. Manifest GETs by tag, fresh within the TTL, from 32 clients on kept-alive connections: through
   one node without Redis (its own loopback), straight to one replica, through HAProxy with one
   replica in rotation (the others in maintenance) and with all three. Printed: GETs per second,
   p50/p99, the proxy CPU per GET (the sum of every replica's mitmdump CPU time over the GETs),
   what that makes per CPU second of one core, and HAProxy's CPU per GET. Rounds alternate between the targets, so that
   load from elsewhere on the machine falls on all alike.
2. A cold blob (a new random one each) GET by --clients clients at once, following the 307s:
   through HAProxy (the clients spread round-robin over the replicas), from the single node, and
   from a plain registry:2 pull-through cache of the same upstream. Printed: the seconds until
   every client had it (each hashes what it gets) and the upstream's GETs / HEADs of it (its
   access log), counted once the cache has stored it.

Everything runs in private namespaces and is removed when the run ends, however it ends.
Figures are printed, never asserted: on a 2-core machine the replicas share the same two cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from scripts.bench_cold import cold_pulls, cpu_seconds
from scripts.bench_manifests import latencies, percentile, pull_seconds
from scripts.bench_setup import REPOSITORY, private_and_bounded
from tests.support.cluster import Cluster
from tests.support.parts import TEST_DOMAIN, Upstream, build_image, docker_io_stack, push_blob, random_chunks

CLUSTER_PORT = 5000  # HAProxy, on every address of the benchmark's namespace; each replica's in its own
NODE_PORT = 5200  # the single node, on the benchmark's loopback (and +1, +50, +70, +80)
ALONE_PORT = 6100  # registry:2 alone; the cluster's upstream is on 6000 of the bridge's address
HOST = f"docker.io.{TEST_DOMAIN}"
MANIFEST_CLIENTS = 32
SETTINGS = {"REGCACHE_TAG_TTL": "3600"}  # every tag GET after the first is a fresh one


def put_in_rotation(cluster: Cluster, indexes: set[int]) -> None:
    """Only these replicas take new connections from HAProxy; the others are in maintenance."""
    for index in range(len(cluster.replicas)):
        cluster.balancer.command(f"{'enable' if index in indexes else 'disable'} server replicas/replica-{index}")
    cluster.balancer.wait_for_rotation(indexes)


def load_average() -> str:
    return "/".join(f"{load:.2f}" for load in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="manifest GETs per client, target and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size-mib", type=int, default=128, help="the cold blob's size in MiB")
    parser.add_argument("--clients", type=int, default=8, help="clients of the cold blob")
    parser.add_argument("--time-limit", type=float, default=900, help="give up and clean up after this many seconds")
    args = parser.parse_args()
    size = args.size_mib << 20
    private_and_bounded([HOST], args.time_limit)
    print(f"load average before starting: {load_average()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="regcache-bench-"))
    parts = []
    try:
        cluster = Cluster(workdir / "cluster", CLUSTER_PORT, settings=SETTINGS)
        parts.append(cluster)
        cluster.start()
        node = docker_io_stack(workdir / "node", cluster.upstream, NODE_PORT, SETTINGS)
        parts.append(node)
        node.start()
        alone = Upstream(workdir / "alone", ALONE_PORT, {"proxy": {"remoteurl": cluster.upstream.url}})
        parts.append(alone)
        alone.start()
        print("the cluster, the single node and registry:2 alone are up", flush=True)

        image = build_image(workdir, "library/small", [("etc/motd", b"hello\n"), ("usr/share/a", os.urandom(5000))])
        cluster.upstream.push(image)
        tag_path = f"/v2/{image.name}/manifests/{image.tag}"
        replicas = set(range(len(cluster.replicas)))
        node_proxy, balancer = [node.child("mitmdump")], [cluster.balancer.process.pid]
        replica_proxies = [replica.child("mitmdump") for replica in cluster.replicas]
        # name: (address, port, HAProxy's rotation (None: HAProxy not in the way), the proxies whose CPU counts)
        targets = {
            "one node, no Redis": ("127.0.0.1", NODE_PORT, None, node_proxy),
            "1 replica, direct": (cluster.replicas[0].address, CLUSTER_PORT, None, replica_proxies),
            "1 replica, HAProxy": ("127.0.0.1", CLUSTER_PORT, {0}, replica_proxies),
            f"{len(replicas)} replicas, HAProxy": ("127.0.0.1", CLUSTER_PORT, replicas, replica_proxies),
        }
        for port in (NODE_PORT, CLUSTER_PORT):  # the tag known, and every proxy past its first, slower requests
            pull_seconds(f"{HOST}:{port}", image.reference, workdir)
            latencies(port, f"{HOST}:{port}", tag_path, 2 * len(replicas), 50)
        measured = {name: {"latencies": [], "wall": 0.0, "proxy": 0.0, "haproxy": 0.0} for name in targets}
        load_during = []
        for _ in range(args.rounds):
            for name, (address, port, rotation, proxies) in targets.items():
                if rotation is not None:
                    put_in_rotation(cluster, rotation)
                proxy_before, balancer_before = cpu_seconds(proxies), cpu_seconds(balancer)
                started = time.perf_counter()
                values = latencies(port, f"{HOST}:{port}", tag_path, MANIFEST_CLIENTS, args.requests, address)
                figures = measured[name]
                figures["wall"] += time.perf_counter() - started
                figures["latencies"] += values
                figures["proxy"] += cpu_seconds(proxies) - proxy_before
                figures["haproxy"] += cpu_seconds(balancer) - balancer_before if rotation is not None else 0.0
                load_during.append(load_average())
                print(f"  {name}: {len(values) / (time.perf_counter() - started):.0f} GETs/s", flush=True)

        cold = {}
        for name, base, storage in (
            (f"{len(replicas)} replicas, HAProxy", f"http://{cluster.host}", cluster.storage / "dockerhub"),
            ("one node, no Redis", f"http://{HOST}:{NODE_PORT}", node.data_dir / "dockerhub" / "storage"),
            ("registry:2 alone", alone.url, alone.storage),
        ):
            digest = push_blob(cluster.upstream.url, REPOSITORY, random_chunks(size), timeout=300)
            cold[name] = cold_pulls(cluster.upstream, base, storage, digest, args.clients, size)
            print(f"  cold blob, {name}: done", flush=True)
        load_after = load_average()
    finally:
        signal.alarm(0)  # the clean-up runs to its end
        for part in reversed(parts):
            part.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nmanifest GETs by tag (fresh within the TTL), {MANIFEST_CLIENTS} clients, keep-alive, "
          f"{args.rounds} round(s) of {args.requests} per client; {os.cpu_count()} cores")
    print(f"{'target':<22} {'GETs/s':>7} {'p50 ms':>7} {'p99 ms':>7} | {'proxy CPU/GET':>13} "
          f"{'GETs per CPU-s':>14} | {'HAProxy CPU/GET':>15}")
    for name, figures in measured.items():
        count = len(figures["latencies"])
        per_get = figures["proxy"] / count
        haproxy = f"{figures['haproxy'] / count * 1000:12.3f} ms" if targets[name][2] is not None else ""
        print(f"{name:<22} {count / figures['wall']:7.0f} {percentile(figures['latencies'], 0.5) * 1000:7.2f} "
              f"{percentile(figures['latencies'], 0.99) * 1000:7.2f} | {per_get * 1000:10.3f} ms "
              f"{1 / per_get:14.0f} | {haproxy:>15}")
    print(f"load average (1/5/15 min) after each row: {', '.join(load_during)}")
    print(f"\ncold blob, {args.size_mib} MiB (a new one per row), {args.clients} clients at once, following the 307s")
    print(f"{'target':<22} {'seconds':>8} {'upstream GETs / HEADs':>22}")
    for name, pulls in cold.items():
        print(f"{name:<22} {pulls.seconds:8.2f} {pulls.counts:>22}")
    print(f"load average after the cold pulls: {load_after}")


if __name__ == "__main__":
    main()
