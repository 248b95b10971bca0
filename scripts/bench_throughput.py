#!/usr/bin/env python3
"""Warm-layer throughput: the proxy against the registry:2 cache it fronts, 1 and 8 clients.

    sudo .venv/bin/python scripts/bench_throughput.py [--size-mib 256] [--clients 1,8] [--repeats 3]

One random blob is pulled through the proxy once, so the cache holds it. Then N clients at
once GET it, first straight from the registry:2 cache, then through the proxy; each run's
MB/s counts all N transfers over the wall time until the last one ends. The median of the
repeats is printed, with the proxy/direct ratio (issue 2's target for warm layers: at least
0.9x with 1 client, 0.7x with 8). Clients are Python threads reading 1 MiB at a time into one
buffer, without hashing, so they cost little CPU next to the servers (their CPU time is
printed). Not part of the test suite: figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench_setup import BenchStack, fetch, fetch_in_parallel, mb_per_s

TARGETS = {1: 0.9, 8: 0.7}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="blob size in MiB (default: 256)")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (default: 1,8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median is printed (default: 3)")
    parser.add_argument("--time-limit", type=float, default=600, help="give up and clean up after this many seconds")
    args = parser.parse_args()
    size = args.size_mib << 20
    client_counts = [int(n) for n in args.clients.split(",")]

    rows = []
    with BenchStack(size, args.time_limit) as bench:
        fetch(bench.proxy_url, bench.digest, timeout=120)  # warms the cache, and checks the bytes
        bench.wait_cached()
        for clients in client_counts:
            speeds = {}
            for name, url in (("direct", bench.cache_url), ("proxy", bench.proxy_url)):
                before = os.times()
                runs = [fetch_in_parallel(url, clients, size) for _ in range(args.repeats)]
                after = os.times()
                client_cpu = (after.user - before.user + after.system - before.system) / sum(runs)
                speeds[name] = mb_per_s(size * clients, statistics.median(runs))
                rows.append(f"{clients} client(s), {name:6}: {speeds[name]:7.1f} MB/s  "
                            f"(runs {', '.join(f'{mb_per_s(size * clients, r):.0f}' for r in runs)} MB/s; "
                            f"client CPU {client_cpu:.0%} of a core)")
            ratio = speeds["proxy"] / speeds["direct"]
            target = f" (target >= {TARGETS[clients]}x)" if clients in TARGETS else ""
            rows.append(f"{clients} client(s), proxy/direct: {ratio:.2f}x{target}")

    print(f"blob: {size / 2**20:.0f} MiB, warm in the cache; median of {args.repeats} runs")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
