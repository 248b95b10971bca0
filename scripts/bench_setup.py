"""What the benchmarks share: a private upstream with one random blob, `regcache up`, clients.

Run as root. The benchmark moves itself into private network and mount namespaces (as the
test suite does), so its servers use the usual ports without touching the machine's, and it
removes every file it made, big blobs included, however it ends: done, failed, Ctrl-C,
SIGTERM or over its time limit.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from tests.support.parts import (
    REGISTRY_PROGRAM, TEST_DOMAIN, Stack, Upstream, cache_holds, child_pids, command_line, docker_io_stack,
    enter_private_namespaces, poll, push_blob, random_chunks, wait_for_port,
)

PROXY_PORT, UPSTREAM_PORT = 5000, 6000  # regcache's defaults: the benchmark has a network of its own
CACHE_PORT = PROXY_PORT + 1  # where docker_io_stack runs the cache
DATAPLANE_PORT = PROXY_PORT + 50  # where Stack puts the data plane
REPOSITORY = "library/bench"
READ_CHUNK = 1 << 20


class TimeLimit(SystemExit):
    """Ends the benchmark with a message, running every clean-up on the way out."""


def private_and_bounded(hostnames: list[str], time_limit: float) -> None:
    """Moves the benchmark into private namespaces with `hostnames` on loopback, and ends it
    (clean-ups run) after `time_limit` seconds or on SIGTERM."""
    enter_private_namespaces(hostnames)

    def over_time(*_) -> None:
        raise TimeLimit(f"over the time limit of {time_limit:.0f}s; cleaning up")

    signal.signal(signal.SIGALRM, over_time)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM; cleaning up"))
    signal.alarm(int(time_limit))


class BenchStack:
    """Upstream registry holding one random blob of `blob_size` bytes (none if 0), and `regcache up`
    caching it, with `settings` and `args` added (e.g. --web).

    A context manager: entering builds everything, leaving stops it and deletes its files.
    """

    def __init__(self, blob_size: int, time_limit: float, settings: dict | None = None,
                 args: tuple[str, ...] = (), before_stack: Callable[[Path], dict] | None = None) -> None:
        self.blob_size, self.time_limit = blob_size, time_limit
        self.settings, self.args = settings, args
        # Starts what the stack needs inside the benchmark's namespaces (say an S3 server), given
        # a folder of its own, and returns settings to add; its processes must end with this one's.
        self.before_stack = before_stack
        self.workdir: Path | None = None
        self.upstream: Upstream | None = None
        self.stack: Stack | None = None
        self.digest = ""

    def __enter__(self) -> "BenchStack":
        private_and_bounded([f"docker.io.{TEST_DOMAIN}"], self.time_limit)
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix="regcache-bench-"))
            self.upstream = Upstream(self.workdir / "upstream", UPSTREAM_PORT).start()
            if self.blob_size:
                started = time.monotonic()
                self.digest = push_blob(self.upstream.url, REPOSITORY, random_chunks(self.blob_size))
                print(f"pushed a {self.blob_size / 2**20:.0f} MiB random blob to the upstream "
                      f"in {time.monotonic() - started:.1f}s", flush=True)
            settings = {**(self.settings or {}), **(self.before_stack(self.workdir) if self.before_stack else {})}
            self.stack = docker_io_stack(self.workdir / "stack", self.upstream, PROXY_PORT, settings, self.args).start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_) -> None:
        signal.alarm(0)
        if self.stack:
            self.stack.stop()
        if self.upstream:
            self.upstream.stop()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def proxy_url(self) -> str:
        """The blob through regcache, by the virtual host name a user's client would use."""
        return f"http://docker.io.{TEST_DOMAIN}:{PROXY_PORT}/v2/{REPOSITORY}/blobs/{self.digest}"

    @property
    def cache_url(self) -> str:
        """The blob straight from the registry:2 cache, bypassing the proxy."""
        return f"http://127.0.0.1:{CACHE_PORT}/v2/{REPOSITORY}/blobs/{self.digest}"

    @property
    def proxy_pid(self) -> int:
        return self.stack.child("mitmweb" if "--web" in self.args else "mitmdump")

    @property
    def cache_pid(self) -> int:
        return self.stack.child(REGISTRY_PROGRAM)

    @property
    def dataplane_pids(self) -> list[int]:
        """The data plane's parent process, then its workers."""
        parent = next(pid for pid in child_pids(self.stack.process.pid) if "regcache_core.dataplane" in command_line(pid))
        return [parent, *child_pids(parent)]

    @property
    def download_worker_pid(self) -> int:
        """The proxy's download worker (started with the proxy's configuration)."""
        pids = poll(lambda: [pid for pid in child_pids(self.proxy_pid) if "regcache_core.spool.worker" in command_line(pid)],
                    bool, timeout=10)
        if not pids:
            raise LookupError("the proxy runs no download worker")
        return pids[0]

    def wait_cached(self, timeout: float = 60) -> None:
        if not cache_holds(self.stack.data_dir / "dockerhub" / "storage", self.digest, timeout):
            raise TimeoutError(f"the cache did not store the blob within {timeout:.0f}s")


def fetch(url: str, digest: str | None = None, timeout: float = 60, follow: bool = True) -> int:
    """GET url, reading in 1 MiB chunks into one buffer; returns the byte count.

    With `digest`, hashes what arrives and raises if it differs. A redirect (regcache's 307 to
    its data plane) is followed once, as registry clients do, unless `follow` is false.
    """
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = connection.getresponse()
        if follow and response.status in (301, 302, 303, 307, 308):
            response.read()
            return fetch(urljoin(url, response.getheader("Location", "")), digest, timeout, follow=False)
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {response.read(200)!r}")
        hasher = hashlib.sha256() if digest else None
        buffer = memoryview(bytearray(READ_CHUNK))
        received = 0
        while count := response.readinto(buffer):
            if hasher:
                hasher.update(buffer[:count])
            received += count
    finally:
        connection.close()
    if hasher and f"sha256:{hasher.hexdigest()}" != digest:
        raise RuntimeError(f"GET {url}: got sha256:{hasher.hexdigest()}, expected {digest}")
    return received


def fetch_in_parallel(url: str, clients: int, expected_size: int, digest: str | None = None,
                      timeout: float = 60) -> float:
    """`clients` threads each GET url at once (each hashing what it gets, with `digest`); returns
    the wall time until the last one finished."""
    errors: list[BaseException] = []

    def client() -> None:
        try:
            if (received := fetch(url, digest, timeout)) != expected_size:
                raise RuntimeError(f"GET {url}: {received} bytes, expected {expected_size}")
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if errors:
        raise errors[0]
    return elapsed


def add_recycle_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recycle-mib", type=int, default=0,
                        help="before each case, write and remove a file this big (MiB): the case's new page cache "
                             "then comes from pages just freed (recycle_page_cache; default: 0, off)")


def recycled(mib: int) -> str:
    """Says in the benchmark's output whether recycle_page_cache ran."""
    return f"page cache recycled before each case: {mib} MiB" if mib else "page cache not recycled"


def recycle_page_cache(directory: Path, mib: int) -> None:
    """Write `mib` MiB into a file in `directory` and remove it (nothing when 0), so that the page
    cache the next case grows comes from pages the guest freed a moment ago. On a VM whose
    balloon reports free memory to the host (free page reporting: these Firecracker machines),
    the first write into a page the host took back costs a host fault: a 512 MiB file written
    into such pages took 1.5-2.3 CPU s against 0.15-0.25 into recycled ones, and which case lands
    on which pages depends on the kernel's free lists, not on the case. Hardware without a
    balloon, or a node whose page cache is full (new pages come from reclaimed ones), pays the
    recycled figure.

    Call it right before the case: the kernel reports a free block to the host about 2 s after
    it was freed (PAGE_REPORTING_DELAY), so pages freed earlier are the host's again. Measured in
    bench_cold with a 1 s settle between this and the fetch: now and then the spool's write copy
    (copy_folio_from_iter_atomic) took 47% of the download worker's 2.15 CPU s, the case 2.3 s
    instead of 1.2."""
    if not mib:
        return
    path = directory / "page-cache-recycled"
    block = bytes(READ_CHUNK)
    with open(path, "wb") as file:
        for _ in range(mib * (1 << 20) // READ_CHUNK):
            file.write(block)
    path.unlink()


def mb_per_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def nginx_front_door(workdir: Path, port: int, backends: dict[str, str]) -> subprocess.Popen:
    """The seed's front door: Debian's nginx on `port`, sending each virtual host
    `<registry>.<TEST_DOMAIN>` to its cache (registry name -> base URL), with keep-alive to it.
    Runs until the caller stops the process it returns; its files live in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    names = {name: f"cache{index}" for index, name in enumerate(backends)}
    upstreams = "".join(f"  upstream {names[name]} {{ server {urlsplit(url).netloc}; keepalive 64; }}\n"
                        for name, url in backends.items())
    vhosts = "".join(f"    {name}.{TEST_DOMAIN} {names[name]};\n" for name in backends)
    (workdir / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {workdir}/nginx.pid;\nerror_log {workdir}/error.log;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {workdir}/body;\n  proxy_temp_path {workdir}/proxy;\n"
        f"{upstreams}"
        f"  map $host $cache {{\n{vhosts}  }}\n"
        f"  server {{\n    listen 127.0.0.1:{port};\n"
        "    location /v2/ { proxy_pass http://$cache; proxy_http_version 1.1; proxy_set_header Connection \"\";"
        " proxy_set_header Host $http_host; proxy_buffering off; }\n  }\n}\n")
    process = subprocess.Popen(["nginx", "-c", str(workdir / "nginx.conf"), "-p", str(workdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for_port(port)
    return process


# A mitmproxy addon that answers every request at once with a fixed body: what a request costs
# mitmproxy itself, before any addon of regcache's does anything.
_FIXED_ANSWER = """from mitmproxy import http

class FixedAnswer:
    def requestheaders(self, flow):
        flow.response = http.Response.make(200, BODY, {"Content-Type": "application/json"})

BODY = b'{"schemaVersion": 2}'
addons = [FixedAnswer()]
"""


def mitmproxy_floor(workdir: Path, port: int) -> subprocess.Popen:
    """mitmdump in reverse mode on `port` (as regcache runs it: lazy connections), with only
    an addon that answers every request with a fixed body. Stop the process it returns."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "fixed_answer.py").write_text(_FIXED_ANSWER)
    mitmdump = Path(sys.executable).with_name("mitmdump")
    process = subprocess.Popen([str(mitmdump), "--mode", f"reverse:http://127.0.0.1:1@{port}", "--set", "connection_strategy=lazy",
                                "--set", "termlog_verbosity=warn", "--set", "flow_detail=0", "-s", str(workdir / "fixed_answer.py")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for_port(port)
    return process
