"""What shared state costs the proxy: proxy CPU per manifest GET (by tag, by digest; 1 and 8
clients, keep-alive) on one node, and on a replica whose state is shared in a redis-server.

    sudo .venv/bin/python -m scripts.bench_shared_state [--requests 2000] [--rounds 3] [--time-limit 600]

Rounds alternate between the two stacks, so that load from elsewhere on the machine falls on both.
Everything runs in private namespaces and is removed when the run ends, however it ends.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import tempfile
from pathlib import Path

from scripts.bench_manifests import cpu_seconds, latencies, percentile, pull_seconds
from scripts.bench_setup import private_and_bounded
from tests.support.parts import TEST_DOMAIN, Upstream, build_image, docker_io_stack
from tests.support.redis_server import RedisServer

ONE_NODE_PORT, REPLICA_PORT, UPSTREAM_PORT, REDIS_PORT = 5000, 5200, 6000, 6003
HOST = f"docker.io.{TEST_DOMAIN}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per client, stack, kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=600)
    args = parser.parse_args()
    private_and_bounded([HOST], args.time_limit)
    workdir = Path(tempfile.mkdtemp(prefix="regcache-bench-"))
    parts = []
    try:
        upstream = Upstream(workdir / "upstream", UPSTREAM_PORT).start()
        parts.append(upstream)
        redis = RedisServer(workdir / "redis", REDIS_PORT).start()
        parts.append(redis)
        image = build_image(workdir, "library/small", [("etc/motd", b"hello\n"), ("usr/share/a", os.urandom(5000))])
        upstream.push(image)
        settings = {"REGCACHE_TAG_TTL": "3600"}  # every tag request after the first is a fresh one
        stacks = {
            "one node": docker_io_stack(workdir / "one", upstream, ONE_NODE_PORT, settings).start(),
            "replica (Redis)": docker_io_stack(workdir / "replica", upstream, REPLICA_PORT, {
                **settings, "REGCACHE_REDIS_URL": redis.url, "REGCACHE_CLUSTER_SECRET": "bench-secret-0123456789",
                "REGCACHE_DATAPLANE_URL": f"http://127.0.0.1:{REPLICA_PORT + 50}"}).start(),
        }
        parts += stacks.values()
        paths = {"tag": f"/v2/{image.name}/manifests/{image.tag}", "digest": f"/v2/{image.name}/manifests/{image.manifest_digest}"}
        for stack in stacks.values():
            pull_seconds(f"{HOST}:{stack.port}", image.reference, workdir)  # warm: the tag and manifest known
            for path in paths.values():
                latencies(stack.port, f"{HOST}:{stack.port}", path, 1, 200)
        cpu: dict[tuple[str, str, int], list[float]] = {}
        p50: dict[tuple[str, str, int], list[float]] = {}
        for _ in range(args.rounds):
            for by, path in paths.items():
                for clients in (1, 8):
                    for name, stack in stacks.items():
                        proxy = stack.child("mitmdump")
                        before = cpu_seconds(proxy)
                        values = latencies(stack.port, f"{HOST}:{stack.port}", path, clients, args.requests // clients)
                        cpu.setdefault((by, name, clients), []).append((cpu_seconds(proxy) - before) / len(values))
                        p50.setdefault((by, name, clients), []).append(percentile(values, 0.5))
        print(f"manifest GETs, keep-alive, {args.rounds} rounds of {args.requests}: median over rounds")
        print(f"{'by':<7} {'clients':>7} {'stack':<16} {'proxy CPU/request':>18} {'p50':>8}")
        for (by, name, clients), values in cpu.items():
            print(f"{by:<7} {clients:>7} {name:<16} {statistics.median(values) * 1000:15.3f} ms "
                  f"{statistics.median(p50[by, name, clients]) * 1000:5.2f} ms", flush=True)
    finally:
        signal.alarm(0)  # the time limit's alarm: the clean-up runs to its end, and nothing fires after it
        for part in reversed(parts):
            part.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
