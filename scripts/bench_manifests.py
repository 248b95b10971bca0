"""Manifests by tag and by digest, side by side in one run: registry:2 (the cache) direct, the
seed's nginx front door in front of it, and regcache; then a warm skopeo pull of a small image
with the upstream 30 ms away, through regcache and through registry:2 alone; then 32
concurrent clients. mitmproxy answering from a one-line addon shows the least a request through
it costs.

    sudo .venv/bin/python -m scripts.bench_manifests [--requests 300] [--time-limit 600]

Every client keeps its connection alive. The upstream sits behind a relay that holds each
request for --delay-ms (0 for the latency runs, 30 for the pulls: this kernel has no netem).
Everything runs in private namespaces and is removed when the run ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from scripts.bench_setup import mitmproxy_floor, nginx_front_door, private_and_bounded
from tests.support.parts import (
    MANIFEST_TYPES, TEST_DOMAIN, Upstream, build_image, docker_io_stack, skopeo,
    stop_process,
)

PROXY_PORT, CACHE_PORT, NGINX_PORT, UPSTREAM_PORT, RELAY_PORT, ALONE_PORT, FLOOR_PORT = 5000, 5001, 5090, 6000, 6001, 6002, 6003
HOST = f"docker.io.{TEST_DOMAIN}"


class DelayRelay:
    """A TCP relay in front of the upstream that holds every chunk a client sends for `delay`
    seconds: each request reaches the upstream that much later, as over a long link."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port, self.target_port = port, target_port
        self.delay = 0.0
        self.url = f"http://127.0.0.1:{port}"
        self.loop = asyncio.new_event_loop()

    def start(self) -> "DelayRelay":
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", self.port), self.loop).result(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _serve(self, client_reader, client_writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(reader, writer, delay: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if delay and self.delay:
                        await asyncio.sleep(self.delay)
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, upstream_writer, True), pipe(upstream_reader, client_writer, False))


def latencies(port: int, host: str | None, path: str, clients: int, requests: int,
              address: str = "127.0.0.1") -> list[float]:
    """Seconds per GET of `path` at `address`, `requests` per client, each client on one kept-alive connection."""
    results: list[float] = []
    errors: list[BaseException] = []

    def client() -> None:
        connection = http.client.HTTPConnection(address, port, timeout=30)
        headers = {"Accept": MANIFEST_TYPES, **({"Host": host} if host else {})}
        try:
            for _ in range(requests):
                started = time.perf_counter()
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {path} on :{port}: {response.status}")
                results.append(time.perf_counter() - started)
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f}"


def pull_seconds(registry: str, reference: str, workdir: Path) -> float:
    """Wall time of one skopeo pull of `reference` into a fresh OCI layout."""
    destination = workdir / f"pull-{registry.replace(':', '_')}"
    started = time.monotonic()
    result = skopeo("copy", "--src-tls-verify=false", f"docker://{registry}/{reference}", f"oci:{destination}")
    took = time.monotonic() - started
    shutil.rmtree(destination, ignore_errors=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per client and target")
    parser.add_argument("--pulls", type=int, default=7, help="skopeo pulls per target")
    parser.add_argument("--delay-ms", type=float, default=30, help="how far away the upstream is, for the pulls")
    parser.add_argument("--time-limit", type=float, default=600)
    args = parser.parse_args()
    private_and_bounded([HOST], args.time_limit)
    workdir = Path(tempfile.mkdtemp(prefix="regcache-bench-"))
    upstream = relay = stack = nginx = alone = floor = None
    try:
        upstream = Upstream(workdir / "upstream", UPSTREAM_PORT).start()
        relay = DelayRelay(RELAY_PORT, UPSTREAM_PORT).start()
        image = build_image(workdir, "library/small", [
            ("etc/motd", b"hello\n"), ("usr/share/a", os.urandom(5000)), ("usr/share/b", os.urandom(70_000))])
        upstream.push(image)
        # A TTL longer than the run: every tag request after the first is a fresh one.
        stack = docker_io_stack(workdir / "stack", relay, PROXY_PORT, {"REGCACHE_TAG_TTL": "3600"}).start()
        nginx = nginx_front_door(workdir / "nginx", NGINX_PORT, {"docker.io": f"http://127.0.0.1:{CACHE_PORT}"})
        pull_seconds(f"{HOST}:{PROXY_PORT}", image.reference, workdir)  # warms the cache and regcache
        targets = {
            "registry:2": (CACHE_PORT, None),
            "nginx": (NGINX_PORT, f"{HOST}:{NGINX_PORT}"),
            "regcache": (PROXY_PORT, f"{HOST}:{PROXY_PORT}"),
        }
        paths = {"tag": f"/v2/{image.name}/manifests/{image.tag}", "digest": f"/v2/{image.name}/manifests/{image.manifest_digest}"}
        for port, host in targets.values():  # a process just started answers its first requests slower
            for path in paths.values():
                latencies(port, host, path, 1, 100)
        print(f"manifest GETs, {args.requests} per client, keep-alive; milliseconds")
        print(f"{'by':<7} {'clients':>7} {'target':<11} {'p50':>7} {'p99':>7}  proxy CPU per request (less noisy than time)")
        proxy = stack.child("mitmdump")
        p50 = {}
        for by, path in paths.items():
            for clients in (1, 8):
                for name, (port, host) in targets.items():
                    cpu_before = cpu_seconds(proxy)
                    values = latencies(port, host, path, clients, args.requests)
                    cpu = f"{(cpu_seconds(proxy) - cpu_before) / len(values) * 1000:.2f} ms" if name == "regcache" else ""
                    p50[by, clients, name] = percentile(values, 0.5)
                    print(f"{by:<7} {clients:>7} {name:<11} {ms(percentile(values, 0.5))} {ms(percentile(values, 0.99))}  {cpu}", flush=True)
        for clients in (1, 8):
            base = p50["digest", clients, "registry:2"]
            print(f"{clients} client(s): regcache p50 / registry:2's p50 by digest: "
                  f"by tag {p50['tag', clients, 'regcache'] / base:.2f}, by digest {p50['digest', clients, 'regcache'] / base:.2f}")
        # mitmproxy itself, answering each request from a one-line addon: the least a request
        # through it can cost, whatever its addons do.
        floor = mitmproxy_floor(workdir / "floor", FLOOR_PORT)
        latencies(FLOOR_PORT, HOST, paths["tag"], 1, 100)
        for clients in (1, 8):
            values = latencies(FLOOR_PORT, HOST, paths["tag"], clients, args.requests)
            print(f"mitmproxy's floor (a fixed answer), {clients} client(s): p50 {ms(percentile(values, 0.5))} "
                  f"p99 {ms(percentile(values, 0.99))} ms", flush=True)
        targets["mitmproxy's floor"] = (FLOOR_PORT, HOST)
        for name in ("registry:2", "regcache", "mitmproxy's floor"):
            port, host = targets[name]
            values = latencies(port, host, paths["tag"], 32, max(args.requests // 8, 20))
            print(f"32 clients, by tag, {name:<17}: p50 {ms(percentile(values, 0.5))} p99 {ms(percentile(values, 0.99))} ms", flush=True)
        # registry:2 as a user runs it without regcache: its upstream straight behind the relay.
        alone = Upstream(workdir / "alone", ALONE_PORT, {"proxy": {"remoteurl": relay.url}}).start()
        pull_seconds(f"127.0.0.1:{ALONE_PORT}", image.reference, workdir)
        relay.delay = args.delay_ms / 1000
        pulls = {name: [] for name in ("registry:2 alone", "regcache", "upstream itself")}
        registries = {"registry:2 alone": f"127.0.0.1:{ALONE_PORT}", "regcache": f"{HOST}:{PROXY_PORT}",
                      "upstream itself": f"127.0.0.1:{UPSTREAM_PORT}"}
        for _ in range(args.pulls):  # in turns, so that a busy moment of the machine hits all alike
            for name, took in pulls.items():
                took.append(pull_seconds(registries[name], image.reference, workdir))
        median = {name: statistics.median(took) * 1000 for name, took in pulls.items()}
        print(f"warm skopeo pull, upstream {args.delay_ms:g} ms away, median of {args.pulls}: registry:2 alone "
              f"{median['registry:2 alone']:.0f} ms, regcache {median['regcache']:.0f} ms: "
              f"{median['registry:2 alone'] / median['regcache']:.2f}x faster")
        print(f"  (skopeo's own floor: the same pull straight from the upstream, 0 ms away, {median['upstream itself']:.0f} ms)")
    finally:
        signal.alarm(0)
        if nginx:
            stop_process(nginx)
        if floor:
            stop_process(floor)
        if stack:
            stack.stop()
        if alone:
            alone.stop()
        if relay:
            relay.stop()
        if upstream:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
