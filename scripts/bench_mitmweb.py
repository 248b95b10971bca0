#!/usr/bin/env python3
"""How much memory mitmweb holds over many pulls: `regcache up --web` in a private network
namespace, driven with many small requests (manifest GETs) and some streamed blobs, printing
mitmweb's RSS and stored flow count as it goes. Needs root (unshare), like the tests.

    .venv/bin/python scripts/bench_mitmweb.py [--requests 20000] [--blob-every 100] [--max-flows 2000]

Run it with --max-flows 1000000 to see what an untrimmed flow list costs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from parts import TEST_DOMAIN, Upstream, build_image, docker_io_stack, enter_private_namespaces, http_get, push_image  # noqa: E402

PORT, UPSTREAM_PORT = 5000, 6000
HOST = f"docker.io.{TEST_DOMAIN}:{PORT}"
WEB_UI = "http://127.0.0.1:8081"
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmRSS for {pid}")


def drive(image, requests: int, blob_every: int, done: list[int], workers: int = 8) -> None:
    """`requests` requests over `workers` keep-alive connections; every blob_every-th one a layer."""
    layer = image.blob_digests[-1]

    def worker(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        for n in range(index, requests, workers):
            kind = f"blobs/{layer}" if n % blob_every == 0 else f"manifests/{image.tag}"
            conn.request("GET", f"/v2/{image.name}/{kind}", headers={"Host": HOST, "Accept": MANIFEST_TYPES})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            done[0] += 1
        conn.close()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--blob-every", type=int, default=100, help="one request in N fetches the 4 MiB layer")
    parser.add_argument("--max-flows", type=int, default=2000, help="REGCACHE_WEB_MAX_FLOWS")
    args = parser.parse_args()

    enter_private_namespaces([HOST.split(":")[0]])
    workdir = Path(tempfile.mkdtemp(prefix="regcache-bench-web-"))
    upstream = Upstream(workdir / "upstream", UPSTREAM_PORT).start()
    stack = None
    try:
        image = build_image(workdir, "library/bench", [("layer.bin", 4 << 20)])  # above stream_large_bodies
        push_image(image, f"127.0.0.1:{UPSTREAM_PORT}")
        stack = docker_io_stack(workdir / "stack", upstream, PORT, {"REGCACHE_WEB_MAX_FLOWS": str(args.max_flows)},
                                ("--web",)).start()
        mitmweb = stack.child("mitmweb")
        done = [0]
        driver = threading.Thread(target=drive, args=(image, args.requests, args.blob_every, done))
        start = time.monotonic()
        print(f"{args.requests} requests (1 in {args.blob_every} a 4 MiB layer), max flows {args.max_flows}")
        print(f"{'seconds':>8} {'requests':>9} {'RSS MiB':>8} {'flows':>6}")
        driver.start()
        peak = 0.0
        while True:
            finished = not driver.is_alive()
            rss = rss_mib(mitmweb)
            peak = max(peak, rss)
            flows = len(json.loads(http_get(f"{WEB_UI}/flows", timeout=60)[2]))
            print(f"{time.monotonic() - start:8.1f} {done[0]:9d} {rss:8.1f} {flows:6d}", flush=True)
            if finished:
                break
            time.sleep(3)
        print(f"peak RSS {peak:.1f} MiB; {flows} flows kept after {done[0]} requests")
        return 0 if done[0] == args.requests else 1
    finally:
        if stack:
            stack.stop()
        upstream.stop()


if __name__ == "__main__":
    sys.exit(main())
