"""Warm-layer throughput: regcache against the registry:2 cache it fronts and the seed's nginx
front door, 1 and 8 clients, side by side in one run.

    sudo .venv/bin/python -m scripts.bench_throughput [--size-mib 256] [--clients 1,8] [--repeats 3] [--no-dataplane]

One random blob is pulled through the proxy once, so the cache holds it. Then N clients at
once GET it, in turn from each of:
- direct: straight from the registry:2 cache;
- nginx: through the seed's front door (Debian's nginx, a vhost map to the cache; `apt-get
  install nginx`, or `scripts/install bench`);
- regcache: through the proxy, following its 307 to the data plane as registry clients do
  (with --no-dataplane, REGCACHE_DATAPLANE=false: streamed through the proxy, as before the
  data plane).
Each run's MB/s counts all N transfers over the wall time until the last one ends; the cases
take turns, run by run. The median of the repeats is printed, with the ratios to direct (issue 8's target for regcache: at least
1.3x with 1 and with 8 clients) and regcache/nginx (target: at least 2x). Clients are Python
threads reading 1 MiB at a time into one buffer, without hashing, so they cost little CPU next
to the servers (their CPU time is printed). Not part of the test suite: figures are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

from scripts.bench_setup import BenchStack, CACHE_PORT, PROXY_PORT, REPOSITORY, fetch, fetch_in_parallel, mb_per_s, nginx_front_door
from tests.support.parts import TEST_DOMAIN, stop_process

NGINX_PORT = PROXY_PORT + 60
TARGET_VS_DIRECT, TARGET_VS_NGINX = 1.3, 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="blob size in MiB (default: 256)")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (default: 1,8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median is printed (default: 3)")
    parser.add_argument("--no-dataplane", action="store_true", help="REGCACHE_DATAPLANE=false: the proxy streams")
    parser.add_argument("--time-limit", type=float, default=900, help="give up and clean up after this many seconds")
    args = parser.parse_args()
    if shutil.which("nginx") is None:
        sys.exit("nginx is not installed: `apt-get install nginx` (or `scripts/install bench`)")
    size = args.size_mib << 20
    client_counts = [int(n) for n in args.clients.split(",")]
    settings = {"REGCACHE_DATAPLANE": "false"} if args.no_dataplane else {}
    regcache = "regcache (streaming)" if args.no_dataplane else "regcache"

    rows = []
    with BenchStack(size, args.time_limit, settings) as bench:
        nginx = nginx_front_door(bench.workdir / "nginx", NGINX_PORT, {"docker.io": f"http://127.0.0.1:{CACHE_PORT}"})
        try:
            fetch(bench.proxy_url, bench.digest, timeout=120)  # warms the cache, and checks the bytes
            bench.wait_cached()
            fetch(bench.proxy_url, bench.digest, timeout=120)  # and once warm: the data plane's bytes too
            cases = {
                "direct": bench.cache_url,
                "nginx": f"http://docker.io.{TEST_DOMAIN}:{NGINX_PORT}/v2/{REPOSITORY}/blobs/{bench.digest}",
                regcache: bench.proxy_url,
            }
            for clients in client_counts:
                # Round-robin over the cases, so that each repeat of each sees the machine alike.
                runs, cpu = {name: [] for name in cases}, dict.fromkeys(cases, 0.0)
                for _ in range(args.repeats):
                    for name, url in cases.items():
                        before = os.times()
                        runs[name].append(fetch_in_parallel(url, clients, size))
                        after = os.times()
                        cpu[name] += after.user - before.user + after.system - before.system
                speeds = {}
                for name in cases:
                    client_cpu = cpu[name] / sum(runs[name])
                    speeds[name] = mb_per_s(size * clients, statistics.median(runs[name]))
                    rows.append(f"{clients} client(s), {name:20}: {speeds[name]:7.1f} MB/s = {speeds[name] / speeds['direct']:.2f}x direct  "
                                f"(runs {', '.join(f'{mb_per_s(size * clients, r):.0f}' for r in runs[name])} MB/s; "
                                f"client CPU {client_cpu:.0%} of a core)")
                rows.append(f"{clients} client(s), {regcache}/direct {speeds[regcache] / speeds['direct']:.2f}x "
                            f"(target >= {TARGET_VS_DIRECT}x), {regcache}/nginx {speeds[regcache] / speeds['nginx']:.2f}x "
                            f"(target >= {TARGET_VS_NGINX}x)")
        finally:
            stop_process(nginx)

    print(f"blob: {size / 2**20:.0f} MiB, warm in the cache; median of {args.repeats} runs; {os.cpu_count()} cores")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
