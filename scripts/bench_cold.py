"""Cold layers: how many times the upstream is asked for a blob that N clients GET at once.

    sudo .venv/bin/python -m scripts.bench_cold [--size-mib 64] [--clients 1,8]

For each client count, a new random blob (so it is cold everywhere) is pushed to the upstream;
then that many clients GET it at once, first from a plain registry:2 pull-through cache of the
same upstream (registry:2 alone), then through regcache, whose single-flight spools (spool.py)
should make it exactly one upstream GET whatever asks. Every client's bytes are hashed and
checked. The counts come from the upstream's access log, after each cache has stored the blob
(registry:2's own second fetch included): GETs, and HEADs (registry:2 asks its upstream for a
blob's size and digest before each fetch). Not part of the test suite: figures are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import time

from scripts.bench_setup import PROXY_PORT, REPOSITORY, BenchStack, fetch_in_parallel
from tests.support.parts import TEST_DOMAIN, Upstream, cache_holds, push_blob, random_chunks

ALONE_PORT = 6100  # the plain registry:2 cache; BenchStack's ports are 5000.. and 6000
TARGET = 1


def upstream_requests(upstream: Upstream, digest: str, settle: float = 1.0) -> tuple[int, int]:
    """GETs and HEADs of `digest` in the upstream's access log, once the counts stopped changing."""
    counts = (-1, -1)
    while (now := tuple(len(upstream.requests_for(digest, method)) for method in ("GET", "HEAD"))) != counts:
        counts = now
        time.sleep(settle)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64, help="blob size in MiB (default: 64)")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (default: 1,8)")
    parser.add_argument("--time-limit", type=float, default=600, help="give up and clean up after this many seconds")
    args = parser.parse_args()
    size = args.size_mib << 20

    rows = []
    with BenchStack(0, args.time_limit) as bench:
        alone = Upstream(bench.workdir / "alone", ALONE_PORT, {"proxy": {"remoteurl": bench.upstream.url}}).start()
        try:
            for clients in (int(n) for n in args.clients.split(",")):
                digest = push_blob(bench.upstream.url, REPOSITORY, random_chunks(size))
                counts, seconds = {}, {}
                for name, base, storage in (
                    ("registry:2 alone", alone.url, alone.storage),
                    ("regcache", f"http://docker.io.{TEST_DOMAIN}:{PROXY_PORT}", bench.stack.data_dir / "dockerhub" / "storage"),
                ):
                    before = upstream_requests(bench.upstream, digest)
                    seconds[name] = fetch_in_parallel(f"{base}/v2/{REPOSITORY}/blobs/{digest}", clients, size, digest,
                                                      timeout=300)
                    if not cache_holds(storage, digest, timeout=120):
                        raise TimeoutError(f"{name} did not store the blob")
                    after = upstream_requests(bench.upstream, digest)
                    counts[name] = f"{after[0] - before[0]} / {after[1] - before[1]}"
                rows.append((clients, counts["registry:2 alone"], counts["regcache"],
                             seconds["registry:2 alone"], seconds["regcache"]))
        finally:
            alone.stop()

    print(f"cold blob: {size / 2**20:.0f} MiB, a new one per row; upstream GETs / HEADs of it (from its access log), "
          "and seconds until every client had it")
    print(f"{'clients at once':>15}  {'registry:2 alone':>16}  {'regcache':>8}  {'(seconds: alone / regcache)':>28}")
    for clients, alone_count, regcache_count, alone_seconds, regcache_seconds in rows:
        print(f"{clients:>15}  {alone_count:>16}  {regcache_count:>8}  {alone_seconds:>13.1f} / {regcache_seconds:<12.1f}"
              f"  (target: exactly {TARGET} GET)")


if __name__ == "__main__":
    main()
