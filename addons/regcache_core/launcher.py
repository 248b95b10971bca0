"""`regcache up`: run the registry:2 caches and the proxy as children, until told to stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cache_backend import INSTALL_HINT, CacheBackend, find_registry_program, local_backends, write_registry_config
from .config import Config

ADDON_SCRIPT = Path(__file__).resolve().parent.parent / "regcache.py"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
# Readiness probes go to our own children on this machine, never through an http_proxy.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    ready: Callable[[], bool]  # true once the child serves


def up(config: Config, env_file: str, web: bool = False) -> int:
    """Start everything, wait until it serves, print where to point clients, then supervise.

    `web` runs mitmweb (a UI of live pulls on 127.0.0.1:8081) instead of mitmdump.

    Returns the exit status: 0 after Ctrl-C or SIGTERM, 1 if a child failed.
    """
    backends = local_backends(config)
    program = find_registry_program()
    if backends and program is None:
        print(f"regcache: the registry program is not on PATH; {INSTALL_HINT}", file=sys.stderr)
        return 1
    proxy_name = "mitmweb" if web else "mitmdump"
    proxy_program = _mitmproxy_program(proxy_name)
    if proxy_program is None:
        print(f"regcache: {proxy_name} is not installed; install regcache with pip (it brings mitmproxy)", file=sys.stderr)
        return 1

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    children: list[Child] = []
    try:
        # The proxy first: each cache's upstream is the proxy's egress listener, and a cache
        # checks its upstream as it starts.
        children.append(_start_proxy(proxy_program, config, env_file, web))
        if not _wait_ready(children, stop):
            return 0 if stop.is_set() else 1
        # After the proxy, which receives the data plane's pull records.
        if config.dataplane is not None:
            children.append(_start_dataplane(env_file))
        for backend in backends:
            children.append(_start_cache(program, backend))
        if not _wait_ready(children, stop):
            return 0 if stop.is_set() else 1
        print(ready_message(config, backends, web), flush=True)
        while not stop.wait(0.5):
            if failed := _exited(children):
                print(f"regcache: {failed.name} exited with status {failed.process.returncode}; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        _stop_all(children)


def _mitmproxy_program(name: str) -> str | None:
    beside_python = Path(sys.executable).with_name(name)
    return str(beside_python) if beside_python.exists() else shutil.which(name)


def _start_cache(program: str, backend: CacheBackend) -> Child:
    config_file = write_registry_config(backend)
    with open(backend.log_file, "ab") as log:
        process = subprocess.Popen(
            [program, "serve", str(config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # we forward Ctrl-C ourselves, in order
            # Not our environment: it may hold upstream passwords, which caches never need.
            env={"PATH": os.environ.get("PATH", os.defpath)},
        )
    return Child(f"cache for {backend.registry.name} (log: {backend.log_file})", process,
                 lambda: answers_http(f"{backend.registry.cache}/v2/"))


def _start_proxy(program: str, config: Config, env_file: str, web: bool) -> Child:
    command = [
        program,
        "--scripts", str(ADDON_SCRIPT),
        "--set", f"regcache_env_file={env_file}",
        "--set", "termlog_verbosity=warn",  # no line per connection
    ]
    # mitmdump: the pull log is the record of requests. mitmweb: nobody to open a browser for.
    command += ["--set", "web_open_browser=false"] if web else ["--set", "flow_detail=0"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    # The admin endpoint only: a probe of the client port would be a request in the pull log
    # and the metrics. The admin endpoint starts once mitmproxy's listeners are open.
    return Child(f"proxy ({Path(program).name})", process, lambda: answers_http(config.admin_url("/live")))


def _start_dataplane(env_file: str) -> Child:
    # It says when every worker serves on a pipe: a probe of its port would be a request in the
    # pull log, and a connection alone could be accepted by whatever else holds the port.
    ready, ready_to_write = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "regcache_core.dataplane", "--env-file", env_file, "--ready-fd", str(ready_to_write)],
            stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=(ready_to_write,))
    finally:
        os.close(ready_to_write)
    os.set_blocking(ready, False)
    said = bytearray()

    def says_ready() -> bool:
        try:
            said.extend(os.read(ready, 64))
        except BlockingIOError:
            pass
        return said.startswith(b"ready")

    return Child("data plane", process, says_ready)


def _wait_ready(children: list[Child], stop: threading.Event) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    waiting = list(children)
    while waiting:
        if failed := _exited(children):
            print(f"regcache: {failed.name} exited with status {failed.process.returncode} while starting", file=sys.stderr)
            return False
        if time.monotonic() > deadline:
            names = ", ".join(c.name for c in waiting)
            print(f"regcache: not ready after {READY_TIMEOUT:.0f}s: {names}", file=sys.stderr)
            return False
        waiting = [c for c in waiting if not c.ready()]
        if waiting and stop.wait(0.2):
            return False
    return True


def answers_http(url: str) -> bool:
    try:
        _NO_PROXY.open(url, timeout=1).close()
    except urllib.error.HTTPError:
        pass  # an HTTP error status still means the server is up
    except (OSError, ValueError):
        return False
    return True


def _exited(children: list[Child]) -> Child | None:
    return next((c for c in children if c.process.poll() is not None), None)


def _stop_all(children: list[Child]) -> None:
    """Stop the proxy first (no new pulls), then the data plane and the caches; kill what does
    not stop in time."""
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
        try:
            child.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def ready_message(config: Config, backends: list[CacheBackend], web: bool = False) -> str:
    local = {b.registry.key for b in backends}
    lines = [
        f"regcache is ready on port {config.port}; pull log: {config.pull_log}",
        f"metrics and health: {config.admin_url('/metrics')}, /ready, /live",
    ]
    if dataplane := config.dataplane:
        where = dataplane.url or f"port {dataplane.port} of the host name clients use"
        lines.append(f"data plane (warm layers of {dataplane.min_size} bytes and more, {dataplane.workers} workers) "
                     f"on {where}: clients must reach it too")
    width = max(len(r.name) for r in config.registries)
    for r in config.registries:
        where = f"cache {r.cache}" + (" (run here)" if r.key in local else "") if r.cache else "uncached, passes through"
        lines.append(f"  {r.name:<{width}}  http://{r.name}.{config.domain}:{config.port}  <- {r.upstream}, {where}")
    lines.append(f"containerd may also use http://<this host>:{config.port} for every registry (it adds ?ns=<registry>).")
    if web:
        lines.append("mitmweb shows live pulls at http://127.0.0.1:8081 (its web_host and web_port options).")
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)
