"""Cold layers: N clients GET a blob nobody holds, from registry:2 alone and through regcache.

    sudo .venv/bin/python -m scripts.bench_cold [--size-mib 256] [--clients 1,8] [--limit-mbit 800]

For each link (the upstream on plain loopback, then behind a rate limit) and each client count,
a new random blob (so it is cold everywhere) is pushed to the upstream; then that many clients
GET it at once from a plain registry:2 pull-through cache of the same upstream (registry:2
alone) and through regcache (following its 307 as registry clients do), the two taking turns
at going first, row by row. Every client's bytes are hashed and checked. Printed per row: the
seconds until every client had the blob; the upstream's GETs and HEADs of it (from its access
log, once each cache has stored it: registry:2's own second fetch included); the CPU seconds the
whole machine spent while the clients fetched (every process: the upstream, the cache, the
clients' hashing), and the share of its CPU time left idle: where that share is near 0, the
time is the CPU work divided by the cores; the CPU seconds the proxy, the data plane (parent and
workers) and the proxy's download worker spent per GiB of cold blob, from the first client
request to the cache holding it. At the end: their peak RSS, and for a client count given more
than once (`--clients 1,1,1,1,1`), the median of its rows.

The rate limit is tc's `tbf` under an `htb` class that only the upstream's answers go through
(a u32 filter on its source port), on this benchmark's own loopback: this kernel has tbf and
htb, not netem or prio. Not part of the test suite: figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scripts.bench_setup import (
    PROXY_PORT, REPOSITORY, UPSTREAM_PORT, BenchStack, add_recycle_option, fetch_in_parallel, recycle_page_cache, recycled,
)
from tests.support.parts import TEST_DOMAIN, Upstream, cache_holds, memory_mib, push_blob, random_chunks

ALONE_PORT = 6100  # the plain registry:2 cache; BenchStack's ports are 5000.. and 6000
TICKS = os.sysconf("SC_CLK_TCK")


def upstream_requests(upstream: Upstream, digest: str, settle: float = 1.0) -> tuple[int, int]:
    """GETs and HEADs of `digest` in the upstream's access log, once the counts stopped changing."""
    counts = (-1, -1)
    while (now := tuple(len(upstream.requests_for(digest, method)) for method in ("GET", "HEAD"))) != counts:
        counts = now
        time.sleep(settle)
    return counts


@dataclass
class ColdPulls:
    seconds: float  # until the last client had the blob
    counts: str  # the upstream's "GETs / HEADs" of it, once the cache stored it
    machine_cpu: float  # CPU seconds the whole machine spent meanwhile (every process: upstream, caches, clients)
    machine_idle: float  # the fraction of the machine's CPU time left idle meanwhile


def cold_pulls(upstream: Upstream, base: str, storage: Path, digest: str, clients: int, size: int,
               just_before: Callable[[], None] = lambda: None) -> ColdPulls:
    """`clients` GET the cold blob `digest` at once from the registry at `base` (following 307s,
    each checking its bytes), `just_before()` run right before they start; the cache (its storage
    at `storage`) must then store it."""
    before = upstream_requests(upstream, digest)
    just_before()
    machine_before = machine_ticks()
    seconds = fetch_in_parallel(f"{base}/v2/{REPOSITORY}/blobs/{digest}", clients, size, digest, timeout=600)
    busy, idle, total = (now - then for now, then in zip(machine_ticks(), machine_before))
    if not cache_holds(storage, digest, timeout=300):
        raise TimeoutError(f"{base} did not store the blob in {storage} within 300s")
    after = upstream_requests(upstream, digest)
    return ColdPulls(seconds, f"{after[0] - before[0]} / {after[1] - before[1]}", busy / TICKS, idle / total)


def machine_ticks() -> tuple[int, int, int]:
    """The machine's busy, idle and total CPU ticks so far, all cores, from /proc/stat's first
    line. Waiting for I/O counts as idle; time the host took (steal) as neither."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    busy = user + nice + system + irq + softirq
    return busy, idle + iowait, busy + idle + iowait + steal


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds of these processes so far (utime and stime of /proc/PID/stat)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def limit_upstream(mbit: int | None) -> None:
    """Answers from the upstream's port at `mbit` Mbit/s (None: no limit), on this namespace's lo."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], stderr=subprocess.DEVNULL)
    if mbit is None:
        return
    for command in (
        "qdisc add dev lo root handle 1: htb default 10",
        "class add dev lo parent 1: classid 1:10 htb rate 100gbit",
        "class add dev lo parent 1: classid 1:20 htb rate 100gbit",
        f"qdisc add dev lo parent 1:20 handle 20: tbf rate {mbit}mbit burst 1mb latency 200ms",
        f"filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport {UPSTREAM_PORT} 0xffff flowid 1:20",
    ):
        subprocess.run(["tc", *command.split()], check=True, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="blob size in MiB (default: 256)")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (default: 1,8)")
    parser.add_argument("--limit-mbit", type=int, default=800,
                        help="the limited upstream link, Mbit/s (default: 800, i.e. 100 MB/s; 0: loopback only)")
    add_recycle_option(parser)
    parser.add_argument("--time-limit", type=float, default=1200, help="give up and clean up after this many seconds")
    args = parser.parse_args()
    size = args.size_mib << 20
    links = [("loopback", None)] + ([(f"{args.limit_mbit} Mbit/s", args.limit_mbit)] if args.limit_mbit else [])

    rows = []
    with BenchStack(0, args.time_limit) as bench:
        alone = Upstream(bench.workdir / "alone", ALONE_PORT, {"proxy": {"remoteurl": bench.upstream.url}}).start()
        regcache_pids = {"proxy": [bench.proxy_pid], "data plane": bench.dataplane_pids,
                         "download worker": [bench.download_worker_pid]}
        try:
            for link, mbit in links:
                for clients in (int(n) for n in args.clients.split(",")):
                    limit_upstream(None)  # pushing is not what is measured
                    digest = push_blob(bench.upstream.url, REPOSITORY, random_chunks(size), timeout=300)
                    limit_upstream(mbit)
                    pulls, cpu = {}, {}
                    cases = [("registry:2 alone", alone.url, alone.storage),
                             ("regcache", f"http://docker.io.{TEST_DOMAIN}:{PROXY_PORT}",
                              bench.stack.data_dir / "dockerhub" / "storage")]
                    if len(rows) % 2:  # taking turns at going first: the machine's state then favours neither
                        cases.reverse()
                    for name, base, storage in cases:
                        cpu_before = {part: cpu_seconds(pids) for part, pids in regcache_pids.items()}
                        pulls[name] = cold_pulls(bench.upstream, base, storage, digest, clients, size,
                                                 lambda: recycle_page_cache(bench.workdir, args.recycle_mib))
                        if name == "regcache":
                            cpu = {part: (cpu_seconds(pids) - cpu_before[part]) / (size / 2**30)
                                   for part, pids in regcache_pids.items()}
                    rows.append((link, clients, pulls, cpu))
                    print(f"{link}, {clients} client(s): done", flush=True)
        finally:
            limit_upstream(None)
            alone.stop()
        peaks = {"proxy": memory_mib(bench.proxy_pid)["VmHWM"],
                 "download worker": memory_mib(bench.download_worker_pid)["VmHWM"],
                 "data plane (largest process)": max(memory_mib(pid)["VmHWM"] for pid in bench.dataplane_pids)}

    print(f"\ncold blob: {size / 2**20:.0f} MiB, a new one per row; seconds until every client had it; upstream "
          "GETs / HEADs of it; the CPU seconds the whole machine spent meanwhile (the upstream, the cache, the "
          "clients: every process), and how much of its CPU time stayed idle; regcache's CPU seconds per cold GiB "
          f"(until the cache held it); {recycled(args.recycle_mib)}")
    print(f"{'link':>14} {'clients':>7} | {'seconds: alone':>14} {'regcache':>8} | {'GETs/HEADs: alone':>17} "
          f"{'regcache':>8} | {'machine CPU s: alone':>20} {'regcache':>8} | {'idle: alone':>11} {'regcache':>8} | "
          f"{'CPU s/GiB: proxy':>16} {'data plane':>10} {'download worker':>15}")
    for link, clients, pulls, cpu in rows:
        alone, regcache = pulls["registry:2 alone"], pulls["regcache"]
        print(f"{link:>14} {clients:>7} | {alone.seconds:>14.2f} {regcache.seconds:>8.2f} | {alone.counts:>17} "
              f"{regcache.counts:>8} | {alone.machine_cpu:>20.2f} {regcache.machine_cpu:>8.2f} | "
              f"{alone.machine_idle:>11.0%} {regcache.machine_idle:>8.0%} | {cpu['proxy']:>16.2f} "
              f"{cpu['data plane']:>10.2f} {cpu['download worker']:>15.2f}")
    print("peak RSS, MiB: " + ", ".join(f"{part} {mib:.0f}" for part, mib in peaks.items()))
    print_medians(rows)


def print_medians(rows: list) -> None:
    """Per link and client count measured more than once: the median seconds and machine CPU
    seconds of each, the ratio of the seconds and the issue's target (loopback: regcache at most
    registry:2 alone's time; a limited link: regcache at least 5x faster for 8 clients or more)."""
    groups: dict[tuple[str, int], list[dict[str, ColdPulls]]] = {}
    for link, clients, pulls, _ in rows:
        groups.setdefault((link, clients), []).append(pulls)
    for (link, clients), runs in groups.items():
        if len(runs) < 2:
            continue
        alone, regcache = (statistics.median(run[name].seconds for run in runs) for name in ("registry:2 alone", "regcache"))
        alone_cpu, regcache_cpu = (statistics.median(run[name].machine_cpu for run in runs)
                                   for name in ("registry:2 alone", "regcache"))
        target = 1.0 if link == "loopback" else 5.0 if clients >= 8 else None
        verdict = "no target" if target is None else \
            f"target >= {target:g}x: {'met' if alone / regcache >= target else 'not met'}"
        print(f"{link}, {clients} client(s), median of {len(runs)} rows: alone {alone:.2f} s, regcache {regcache:.2f} s, "
              f"{alone / regcache:.2f}x ({verdict}); machine CPU s: alone {alone_cpu:.2f}, regcache {regcache_cpu:.2f}")


if __name__ == "__main__":
    main()
