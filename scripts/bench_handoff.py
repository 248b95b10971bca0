"""Where a redirect to the data plane starts to pay: warm blobs of growing size, one client,
streamed through the proxy against the proxy's 307 followed to the data plane.

    sudo .venv/bin/python -m scripts.bench_handoff [--sizes-kib 16,64,...] [--repeats 40]

Two stacks, one after the other (each in a process and namespaces of its own): REGCACHE_DATAPLANE=false (every blob streams through the
proxy), then REGCACHE_DATAPLANE_MIN_SIZE=0 (every warm blob gets a 307). In each, the blobs
are pulled once (so the cache holds them), then GET `--repeats` times each by one client that
keeps a connection per host open, as Go's registry clients do, and follows the 307. The
median time per GET is printed for both, with the ratio: REGCACHE_DATAPLANE_MIN_SIZE's default
is where the redirect stops losing. Not part of the test suite: figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
from urllib.parse import urljoin, urlsplit

from scripts.bench_setup import PROXY_PORT, REPOSITORY, BenchStack
from tests.support.parts import TEST_DOMAIN, cache_holds, push_blob, random_chunks

MODES = {"streaming": {"REGCACHE_DATAPLANE": "false"}, "redirect": {"REGCACHE_DATAPLANE_MIN_SIZE": "0"}}


class Client:
    """GETs with one kept-alive connection per host, following redirects."""

    def __init__(self) -> None:
        self.connections: dict[str, http.client.HTTPConnection] = {}

    def get(self, url: str) -> int:
        parts = urlsplit(url)
        connection = self.connections.setdefault(parts.netloc, http.client.HTTPConnection(parts.netloc, timeout=30))
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = connection.getresponse()
        body = response.read()
        if response.status == 307:
            return self.get(urljoin(url, response.getheader("Location")))
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {body[:200]!r}")
        return len(body)

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()


def measure(settings: dict, sizes: list[int], repeats: int, time_limit: float) -> dict[int, float]:
    """Median seconds per GET of a warm blob of each size."""
    with BenchStack(0, time_limit, settings) as bench:
        storage = bench.stack.data_dir / "dockerhub" / "storage"
        digests = {size: push_blob(bench.upstream.url, REPOSITORY, random_chunks(size)) for size in sizes}
        client = Client()
        try:
            for digest in digests.values():
                client.get(url_of(digest))  # cold: the cache fetches it
                if not cache_holds(storage, digest, 60):
                    raise TimeoutError(f"the cache did not store {digest}")
            medians = {}
            for size, digest in digests.items():
                client.get(url_of(digest))  # warm-up: connections open, the data plane's too
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    assert client.get(url_of(digest)) == size
                    times.append(time.perf_counter() - started)
                medians[size] = statistics.median(times)
        finally:
            client.close()
    return medians


def url_of(digest: str) -> str:
    return f"http://docker.io.{TEST_DOMAIN}:{PROXY_PORT}/v2/{REPOSITORY}/blobs/{digest}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-kib", default="16,64,256,512,1024,2048,4096,16384", help="blob sizes in KiB")
    parser.add_argument("--repeats", type=int, default=40, help="GETs per blob; the median is printed (default: 40)")
    parser.add_argument("--time-limit", type=float, default=600, help="give up and clean up after this many seconds")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one stack; prints its medians as JSON
    args = parser.parse_args()
    sizes = [int(n) << 10 for n in args.sizes_kib.split(",")]
    if args.mode:
        print(json.dumps(measure(MODES[args.mode], sizes, args.repeats, args.time_limit)))
        return
    results = {}
    for mode in MODES:
        run = subprocess.run([sys.executable, "-m", "scripts.bench_handoff", "--mode", mode, "--sizes-kib", args.sizes_kib,
                              "--repeats", str(args.repeats), "--time-limit", str(args.time_limit)],
                             stdout=subprocess.PIPE, text=True, timeout=args.time_limit + 30)
        if run.returncode != 0:
            sys.exit(f"the {mode} run failed (exit status {run.returncode})")
        results[mode] = {int(size): seconds for size, seconds in json.loads(run.stdout.splitlines()[-1]).items()}
    print(f"median ms per GET of a warm blob, one client, {args.repeats} GETs each")
    print(f"{'size':>10}  {'streaming':>10}  {'redirect':>10}  redirect/streaming")
    for size in sizes:
        streaming, redirect = results["streaming"][size], results["redirect"][size]
        print(f"{size >> 10:>7} KiB  {streaming * 1000:>10.2f}  {redirect * 1000:>10.2f}  {redirect / streaming:.2f}x")


if __name__ == "__main__":
    main()
