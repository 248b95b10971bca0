"""How much memory mitmweb holds over many pulls: `regcache up --web` in a private network
namespace, driven with many small requests (manifest GETs) and some streamed blobs, printing
mitmweb's RSS and stored flow count as it goes. Needs root (unshare), like the tests.

    .venv/bin/python -m scripts.bench_mitmweb [--requests 20000] [--blob-every 100] [--max-flows 2000] [--time-limit 600]

Run it with --max-flows 1000000 to see what an untrimmed flow list costs. Like the other
benchmarks it removes every file it made however it ends (done, failed, Ctrl-C, SIGTERM or
over its time limit). Not part of the test suite: figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from scripts.bench_setup import PROXY_PORT, BenchStack
from tests.support.parts import TEST_DOMAIN, build_image, http_get, memory_mib

HOST = f"docker.io.{TEST_DOMAIN}:{PROXY_PORT}"
WEB_UI = "http://127.0.0.1:8081"
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json"
WORKERS = 8


def drive(image, requests: int, blob_every: int, done: list[int]) -> None:
    """`requests` requests over len(done) keep-alive connections; every blob_every-th one a layer.

    Worker i counts its answers in done[i] alone, so no count is lost between threads.
    """
    layer, workers = image.blob_digests[-1], len(done)

    def worker(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", PROXY_PORT, timeout=60)
        try:
            for n in range(index, requests, workers):
                kind = f"blobs/{layer}" if n % blob_every == 0 else f"manifests/{image.tag}"
                conn.request("GET", f"/v2/{image.name}/{kind}", headers={"Host": HOST, "Accept": MANIFEST_TYPES})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {kind}: {response.status}")
                done[index] += 1
        finally:
            conn.close()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--blob-every", type=int, default=100, help="one request in N fetches the 4 MiB layer")
    parser.add_argument("--max-flows", type=int, default=2000, help="REGCACHE_WEB_MAX_FLOWS")
    parser.add_argument("--time-limit", type=float, default=600, help="give up and clean up after this many seconds")
    args = parser.parse_args()

    with BenchStack(0, args.time_limit, {"REGCACHE_WEB_MAX_FLOWS": str(args.max_flows)}, ("--web",)) as bench:
        image = build_image(bench.workdir, "library/bench", [("layer.bin", 4 << 20)])  # above stream_large_bodies
        bench.upstream.push(image)
        mitmweb = bench.proxy_pid
        done = [0] * WORKERS
        driver = threading.Thread(target=drive, args=(image, args.requests, args.blob_every, done), daemon=True)
        start = time.monotonic()
        print(f"{args.requests} requests (1 in {args.blob_every} a 4 MiB layer), max flows {args.max_flows}")
        print(f"{'seconds':>8} {'requests':>9} {'RSS MiB':>8} {'flows':>6}")
        driver.start()
        peak = 0.0
        while True:
            finished = not driver.is_alive()
            rss = memory_mib(mitmweb)["VmRSS"]
            peak = max(peak, rss)
            flows = len(json.loads(http_get(f"{WEB_UI}/flows", timeout=60)[2]))
            print(f"{time.monotonic() - start:8.1f} {sum(done):9d} {rss:8.1f} {flows:6d}", flush=True)
            if finished:
                break
            driver.join(3)
        print(f"peak RSS {peak:.1f} MiB; {flows} flows kept after {sum(done)} requests")
        return 0 if sum(done) == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
