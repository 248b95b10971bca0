"""The mitmproxy addons. Each hook is short: it reads the flow, calls a plain function
(routing, pull log) and applies the answer. Wiring is explicit, in `make_addons()`."""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

from mitmproxy import ctx, http
from mitmproxy.flow import Error

from .config import Config, ConfigError, load_config
from .pull_log import PullLog, PullRecord, utc_iso
from .routing import Refusal, Target, route

logger = logging.getLogger(__name__)

# Reverse mode needs a destination, but every request gets its own from routing, so this
# placeholder is never contacted (connection_strategy=lazy keeps mitmproxy from dialling it).
PLACEHOLDER_DESTINATION = "http://127.0.0.1:1"
TARGET = "regcache.target"  # flow.metadata key: the routing decision
BYTE_COUNTER = "regcache.bytes"  # flow.metadata key: counts a streamed body
CACHE_RESULT = "regcache.cache"  # flow.metadata key: "hit" or "miss", set once the cache's upstream use is known


class Settings:
    """Loads regcache's configuration (environment + .env) for the other addons."""

    config: Config | None = None

    def load(self, loader) -> None:
        loader.add_option("regcache_env_file", str, ".env", "The .env file regcache reads its settings from.")

    def configure(self, updated: set[str]) -> None:
        if "regcache_env_file" in updated:
            try:
                self.config = load_config(env_file=ctx.options.regcache_env_file)
            except ConfigError as e:
                # Logged, not raised as OptionsError: mitmproxy would print a traceback for a
                # script's OptionsError, where one line says it all. An error logged during
                # start-up makes mitmproxy exit (its errorcheck addon); later, the last good
                # config stays in force.
                logger.error(f"regcache: {e}")


class MirrorDefaults:
    """Turns a plain `mitmdump -s addons/regcache.py` into a registry mirror on REGCACHE_PORT.

    Only options still at mitmproxy's defaults are changed, so explicit flags win.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def configure(self, updated: set[str]) -> None:
        if "mode" not in updated or self.settings.config is None:
            return
        wanted = {
            "mode": [f"reverse:{PLACEHOLDER_DESTINATION}@{self.settings.config.port}"],
            "keep_host_header": True,  # routing reads the client's Host header
            "connection_strategy": "lazy",
            "stream_large_bodies": "1m",  # layers are streamed, never held in memory
        }
        changes = {name: value for name, value in wanted.items() if not ctx.options.has_changed(name)}
        if changes:
            ctx.options.update(**changes)


class Router:
    """Sends each request to its registry's cache (or upstream), or refuses it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        decision = route(
            self.settings.config,
            request.method,
            request.host_header or "",
            request.path,
            proxy_form=request.first_line_format != "relative" and not request.is_http2,
        )
        if isinstance(decision, Refusal):
            if request.stream or "transfer-encoding" in request.headers:
                # mitmproxy answers only after reading the whole request body, and crashes the
                # connection if a body it streams (over stream_large_bodies, or chunked and
                # growing past it) meets a response: drop such a request instead.
                flow.kill()
                return
            flow.response = http.Response.make(
                decision.status, decision.body(), {"Content-Type": "application/json"}
            )
            return
        flow.metadata[TARGET] = decision
        backend = urlsplit(decision.backend)
        request.scheme = backend.scheme
        request.host = backend.hostname
        request.port = backend.port or (443 if backend.scheme == "https" else 80)
        request.path = decision.path


class ByteCounter:
    """A response stream that passes chunks through unchanged and counts them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.count += len(chunk)
        return chunk


class PullLogger:
    """Writes one pull log record per client request, when it ends or fails."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log: PullLog | None = None

    def configure(self, updated: set[str]) -> None:
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None:
            if self.log:
                self.log.close()
            self.log = PullLog(config.pull_log, config.pull_log_stdout)

    def done(self) -> None:
        if self.log:
            self.log.close()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        target = flow.metadata.get(TARGET)
        # Blobs always stream; smaller bodies stream once stream_large_bodies says so.
        if flow.response.stream is True or (target and target.kind == "blob"):
            flow.metadata[BYTE_COUNTER] = flow.response.stream = ByteCounter()

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def _write(self, flow: http.HTTPFlow) -> None:
        if self.log is not None:
            self.log.write(pull_record(flow, time.time()))


def pull_record(flow: http.HTTPFlow, now: float) -> PullRecord:
    target: Target | None = flow.metadata.get(TARGET)
    response = flow.response
    counter = flow.metadata.get(BYTE_COUNTER)
    if counter is not None:
        sent = counter.count
    else:
        sent = len(response.raw_content or b"") if response and flow.request.method != "HEAD" else 0
    if response:
        status = response.status_code
    else:  # mitmproxy answers a failed exchange with 502, and a killed one with nothing
        status = 502 if flow.error and flow.error.msg != Error.KILLED_MESSAGE else 0
    return PullRecord(
        time=utc_iso(flow.request.timestamp_start),
        client=flow.client_conn.peername[0] if flow.client_conn.peername else "",
        registry=target.registry.name if target else None,
        repository=target.repository if target else None,
        kind=target.kind if target else None,
        reference=target.reference if target else None,
        method=flow.request.method,
        status=status,
        bytes=sent,
        duration_ms=round((now - flow.request.timestamp_start) * 1000),
        backend=target.backend if target else None,
        cache=flow.metadata.get(CACHE_RESULT),
        error=flow.error.msg if flow.error else None,
    )


def make_addons() -> list:
    settings = Settings()
    return [settings, MirrorDefaults(settings), Router(settings), PullLogger(settings)]
