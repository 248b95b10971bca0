"""`regcache up`: run the registry:2 caches and the proxy as children, until told to stop.

A cache that exits is started again after a back-off (1 s, doubling to 60 s; back to 1 s once
it has run for a minute): pulls of its registry fail meanwhile, the others go on. The proxy
exiting ends the stack: nothing is served without it. SIGTERM or Ctrl-C goes to the proxy
first, which lets pulls in flight finish (mitm/drain.py), then to the caches. If `regcache up`
itself is killed, its children die with it (parent_death.py); the data directory's pid file
(pid_file.py) names the processes of a stack still running there.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import secrets
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

from .caches import (INSTALL_HINT, CacheBackend, cache_environment, exit_reason, find_registry_program, local_backends,
                     write_registry_config)
from ..config import Config, ConfigError, prepare_directory
from ..objectstore.bucket import prepare_bucket
from .listeners import cannot_listen, proxy_listeners, proxy_modes
from .parent_death import dies_with_this_process
from .pid_file import PidFile, StackProcess, describe, still_running

ADDON_SCRIPT = Path(__file__).resolve().parents[2] / "regcache.py"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
FIRST_BACKOFF = 1.0  # seconds before a cache that exited is started again; doubles per exit
MAX_BACKOFF = 60.0
STEADY = 60.0  # seconds a cache must run for its next exit to count as the first again
# Readiness probes go to our own children on this machine, never through an http_proxy.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Child:
    name: str  # what it is, short: "data plane", "cache for docker.io"
    process: subprocess.Popen
    ready: Callable[[], bool]  # true once the child serves
    reason: Callable[[], str | None] = lambda: None  # why it exited, where its log says
    log: Path | None = None  # where it writes, if not to our output

    @property
    def described(self) -> str:
        """Its name, and its log where it has one of its own."""
        return f"{self.name} (log: {self.log})" if self.log else self.name

    def exited(self, when: str = "") -> str:
        """"<name> exited with status N", and why where its log says (when it exited by itself,
        not by a signal): for the operator, in one line."""
        status = self.process.returncode
        reason = self.reason() if status > 0 else None
        return f"{self.described} exited with status {status}{when}" + (f": {reason}" if reason else "")


@dataclass
class SupervisedCache:
    """A cache and when to start it again after it exited."""

    program: str
    backend: CacheBackend
    child: Child
    started: float
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None  # set while it is down

    def check(self, now: float) -> None:
        """Notice an exit (and plan the restart), or restart once its back-off has passed."""
        if self.restart_at is None:
            if self.child.process.poll() is None:
                return
            if now - self.started >= STEADY:
                self.backoff = FIRST_BACKOFF
            self.restart_at = now + self.backoff
            print(f"regcache: {self.child.exited()}; starting it again in {self.backoff:g}s", file=sys.stderr, flush=True)
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        elif now >= self.restart_at:
            self.child = _start_cache(self.program, self.backend)
            self.started, self.restart_at = now, None
            print(f"regcache: {self.child.described} started again", file=sys.stderr, flush=True)


def up(config: Config, env_file: str, web: bool = False) -> int:
    """Start everything, wait until it serves, print where to point clients, then supervise.

    `web` runs mitmweb (a UI of live pulls on 127.0.0.1:8081) instead of mitmdump. Where mitmweb
    asks for a password and REGCACHE_WEB_PASSWORD is empty, this run makes a token for it.

    Returns the exit status: 0 after Ctrl-C or SIGTERM, 1 if the proxy or the data plane failed,
    or anything failed while starting, 2 (as for a bad setting) for a data directory or cache
    storage it cannot write in.
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

    try:
        for var, directory in [("REGCACHE_DATA_DIR", config.data_dir),
                               *((f"{b.registry.key}_STORAGE", b.storage) for b in backends if b.storage is not None)]:
            prepare_directory(var, directory)
    except ConfigError as e:
        print(f"regcache: {e}", file=sys.stderr)
        return 2
    for backend in backends:
        if backend.registry.object_store is not None and (problem := prepare_bucket(
                f"{backend.registry.key}_STORAGE", config.s3, backend.registry.object_store, config.upstream_timeout)):
            print(f"regcache: {problem}", file=sys.stderr)
            return 2
    if earlier := still_running(config.data_dir):
        print(f"regcache: a stack of an earlier run still runs on {config.data_dir}: {describe(earlier)}; "
              "stop it first, or set REGCACHE_DATA_DIR to another directory", file=sys.stderr)
        return 1
    if problems := list(filter(None, map(cannot_listen, proxy_listeners(config)))):
        print(f"regcache: {problems[0]}", file=sys.stderr)
        return 1

    web_token = secrets.token_urlsafe(16) if web and mitmweb_has_password() and not config.web_password else None

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    children: list[Child] = []
    pid_file = PidFile(config.data_dir)

    def record_pids() -> None:
        pid_file.record([StackProcess(os.getpid(), "regcache up"), *(StackProcess(c.process.pid, c.name) for c in children)])

    try:
        # The proxy first: each cache's upstream is the proxy's egress listener, and a cache
        # checks its upstream as it starts.
        children.append(_start_proxy(proxy_program, config, env_file, web, web_token))
        record_pids()
        if not _wait_ready(children, stop):
            return 0 if stop.is_set() else 1
        # After the proxy, which receives the data plane's pull records.
        if config.dataplane is not None:
            children.append(_start_dataplane(env_file))
        for backend in backends:
            children.append(_start_cache(program, backend))
        record_pids()
        if not _wait_ready(children, stop):
            return 0 if stop.is_set() else 1
        print(ready_message(config, backends, web, web_token), flush=True)
        # The proxy and the data plane are the stack: either exiting ends it. Caches are
        # started again (each serves one registry; the others go on meanwhile).
        essential = len(children) - len(backends)
        caches = [SupervisedCache(program, backend, child, time.monotonic())
                  for backend, child in zip(backends, children[essential:])]
        while not stop.wait(0.5):
            if failed := _exited(children[:essential]):
                print(f"regcache: {failed.exited()}; stopping", file=sys.stderr)
                return 1
            for cache in caches:
                cache.check(time.monotonic())
            children[essential:] = [cache.child for cache in caches]
            record_pids()  # a cache started again has a new pid
        return 0
    finally:
        _stop_all(children, config.stop_grace)
        pid_file.remove()


def mitmweb_has_password() -> bool:
    """mitmweb asks for a password (its web_password option) from mitmproxy 11.1.2 on."""
    version = tuple(int(n) for n in re.findall(r"[0-9]+", importlib.metadata.version("mitmproxy"))[:3])
    return version >= (11, 1, 2)


def _mitmproxy_program(name: str) -> str | None:
    beside_python = Path(sys.executable).with_name(name)
    return str(beside_python) if beside_python.exists() else shutil.which(name)


def _start_cache(program: str, backend: CacheBackend) -> Child:
    config_file = write_registry_config(backend)
    with open(backend.log_file, "ab") as log:
        since = log.tell()  # the log is kept across runs: this run's lines start here
        process = subprocess.Popen(
            [program, "serve", str(config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # we forward Ctrl-C ourselves, in order
            preexec_fn=dies_with_this_process(),
            env=cache_environment(backend),
        )
    return Child(f"cache for {backend.registry.name}", process, lambda: answers_http(f"{backend.registry.cache}/v2/"),
                 lambda: exit_reason(backend.log_file, since), backend.log_file)


def _start_proxy(program: str, config: Config, env_file: str, web: bool, web_token: str | None) -> Child:
    command = [
        program,
        "--scripts", str(ADDON_SCRIPT),
        "--set", f"regcache_env_file={env_file}",
        "--set", "termlog_verbosity=warn",  # no line per connection
    ]
    # The listeners as flags, not left to the addon's defaults: mitmproxy may open its
    # listeners before it loads the script (see MirrorDefaults.running), and its default one
    # (a regular proxy on *:8080) must never open, not even for a moment.
    for mode in proxy_modes(config):
        command += ["--mode", mode]
    # mitmdump: the pull log is the record of requests. mitmweb: nobody to open a browser for.
    command += ["--set", "web_open_browser=false"] if web else ["--set", "flow_detail=0"]
    # Unbuffered: Python buffers a pipe or file (docker logs, a service manager) in blocks, and
    # a warning would sit there until the buffer fills.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if web_token:  # in the environment, not the arguments: those are visible to every user
        env["REGCACHE_WEB_PASSWORD"] = web_token
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                               preexec_fn=dies_with_this_process())
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
            stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=(ready_to_write,),
            preexec_fn=dies_with_this_process())
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
            print(f"regcache: {failed.exited(' while starting')}", file=sys.stderr)
            return False
        if time.monotonic() > deadline:
            names = ", ".join(c.described for c in waiting)
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


def _stop_all(children: list[Child], grace: float) -> None:
    """Stop the proxy first (it takes no new pulls and lets those in flight finish for up to
    `grace` seconds), then the data plane and the caches; kill what does not stop in time."""
    for index, child in enumerate(children):
        if child.process.poll() is None:
            child.process.terminate()
        try:
            child.process.wait(STOP_TIMEOUT + (grace if index == 0 else 0))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def ready_message(config: Config, backends: list[CacheBackend], web: bool = False, web_token: str | None = None) -> str:
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
    if web_token:
        lines.append(f"mitmweb shows live pulls at http://127.0.0.1:8081/?token={web_token} (a token for this run; "
                     "REGCACHE_WEB_PASSWORD sets a password instead).")
    elif web and config.web_password:
        lines.append("mitmweb shows live pulls at http://127.0.0.1:8081 (its password: REGCACHE_WEB_PASSWORD).")
    elif web:
        lines.append("mitmweb shows live pulls at http://127.0.0.1:8081 (its web_host and web_port options).")
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)
