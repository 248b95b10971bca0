"""Memory benchmark: one 1 GiB blob through regcache, cold then warm; prints every process's RSS.

    sudo .venv/bin/python -m scripts.bench_memory [--size-mib 1024] [--time-limit 600]

A local upstream registry gets one random blob (streamed up, never whole in memory);
`regcache up` runs the docker.io cache in front of it. The blob is fetched through the proxy
twice: cold (the cache fetches it from the upstream while the proxy streams it on) and warm
(the proxy answers 307 and the data plane sends it from the cache's disk; the client follows).
What arrives is checked against its sha256. Meanwhile the mitmdump process's VmRSS is sampled;
its VmHWM (peak resident), the data plane's (its parent and each worker) and the registry:2
cache's are printed at the end (issue 8's target: no process over 150 MB). Not part of the
test suite: figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import threading
import time

from scripts.bench_setup import BenchStack, fetch, mb_per_s
from tests.support.parts import memory_mib

SAMPLE_EVERY = 0.05  # seconds


def sampled_peak_rss(pid: int, work) -> tuple[float, float]:
    """Run work() while sampling the process's VmRSS; returns (seconds work took, highest MiB seen)."""
    peak, done = 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(SAMPLE_EVERY):
            peak = max(peak, memory_mib(pid)["VmRSS"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        work()
    finally:
        elapsed = time.monotonic() - started
        done.set()
        sampler.join()
    return elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="blob size in MiB (default: 1024)")
    parser.add_argument("--time-limit", type=float, default=600, help="give up and clean up after this many seconds")
    args = parser.parse_args()
    size = args.size_mib << 20

    with BenchStack(size, args.time_limit) as bench:
        proxy, cache = bench.proxy_pid, bench.cache_pid
        idle = memory_mib(proxy)["VmRSS"]
        get = lambda: fetch(bench.proxy_url, bench.digest, timeout=120)  # noqa: E731
        cold_time, cold_rss = sampled_peak_rss(proxy, get)
        bench.wait_cached()
        warm_time, warm_rss = sampled_peak_rss(proxy, get)
        proxy_memory, cache_memory = memory_mib(proxy), memory_mib(cache)
        dataplane_memory = [memory_mib(pid)["VmHWM"] for pid in bench.dataplane_pids]

    print(f"blob: {size / 2**20:.0f} MiB ({size} bytes), sha256 checked on both GETs")
    print(f"cold GET through the proxy: {cold_time:6.2f} s  {mb_per_s(size, cold_time):7.1f} MB/s  (proxy RSS up to {cold_rss:.1f} MiB)")
    print(f"warm GET by the data plane: {warm_time:6.2f} s  {mb_per_s(size, warm_time):7.1f} MB/s  (proxy RSS up to {warm_rss:.1f} MiB)")
    print(f"proxy (mitmdump) RSS: idle {idle:.1f} MiB, peak (VmHWM) {proxy_memory['VmHWM']:.1f} MiB")
    print(f"data plane RSS, peak (VmHWM): parent {dataplane_memory[0]:.1f} MiB, workers "
          + ", ".join(f"{peak:.1f}" for peak in dataplane_memory[1:]) + " MiB")
    print(f"registry:2 cache RSS: peak (VmHWM) {cache_memory['VmHWM']:.1f} MiB")


if __name__ == "__main__":
    main()
