"""The mitmproxy addons. Each hook is short: it reads the flow, calls a plain function
(routing, pull log, metrics, mitmweb labels) and applies the answer. Wiring is explicit, in `make_addons()`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http

from .admin import AdminServer, Answer, readiness
from .config import DEFAULTS, Config, ConfigError, is_loopback_host, load_config
from .metrics import EXPOSITION_CONTENT_TYPE, Metrics
from .pull_log import PullLog, PullRecord, utc_iso
from .routing import Refusal, Target, route
from .web import finished_flows_beyond, label_flow, redact_credentials

logger = logging.getLogger(__name__)

# Reverse mode needs a destination, but every request gets its own from routing, so this
# placeholder is never contacted (connection_strategy=lazy keeps mitmproxy from dialling it).
PLACEHOLDER_DESTINATION = "http://127.0.0.1:1"
TARGET = "regcache.target"  # flow.metadata key: the routing decision
BYTE_COUNTER = "regcache.bytes"  # flow.metadata key: counts a streamed body
CACHE_RESULT = "regcache.cache"  # flow.metadata key: "hit" or "miss", set once the cache's upstream use is known
IN_FLIGHT = "regcache.in_flight"  # flow.metadata key: counted in the in-flight gauge, not yet finished
RECORD = "regcache.record"  # flow.metadata key: the flow's PullRecord, once it ended


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
                raise exceptions.OptionsError(f"regcache: {e}") from None


class MirrorDefaults:
    """Turns a plain `mitmdump -s addons/regcache.py` into a registry mirror on REGCACHE_PORT.

    Only options still at mitmproxy's defaults are changed, so explicit flags win. It also
    brings REGCACHE_WEB_MAX_FLOWS to the regcache_web_max_flows option (used by mitmweb).
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
            "regcache_web_max_flows": self.settings.config.web_max_flows,
        }
        if "web_columns" in ctx.options.keys():  # mitmweb: show each flow's regcache label
            wanted["web_columns"] = [*ctx.options.web_columns, "comment"]
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


class Recorder:
    """Builds one PullRecord per client request, when it ends or fails, and hands it to every sink.

    Also keeps the in-flight gauge: up when a routed request arrives, down exactly once when
    its flow ends (response or error, whichever comes first; mitmproxy ends every flow with one).
    """

    def __init__(self, metrics: Metrics, sinks: list[Callable[[PullRecord], None]]) -> None:
        self.metrics = metrics
        self.sinks = sinks

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if TARGET in flow.metadata:
            flow.metadata[IN_FLIGHT] = True
            self.metrics.request_started()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        target = flow.metadata.get(TARGET)
        # Blobs always stream; smaller bodies stream once stream_large_bodies says so.
        if flow.response.stream is True or (target and target.kind == "blob"):
            flow.metadata[BYTE_COUNTER] = flow.response.stream = ByteCounter()

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.pop(IN_FLIGHT, False):
            self.metrics.request_finished()
        if RECORD in flow.metadata:
            return
        record = flow.metadata[RECORD] = pull_record(flow, time.time())
        for sink in self.sinks:
            sink(record)


class PullLogger:
    """The pull log file, (re)opened with the settings; `write` is a Recorder sink."""

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

    def write(self, record: PullRecord) -> None:
        if self.log is not None:
            self.log.write(record)


class Admin:
    """Serves /metrics, /ready and /live on REGCACHE_ADMIN_HOST:REGCACHE_ADMIN_PORT (see admin.py)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.server = AdminServer({"/metrics": self._metrics, "/ready": self._ready, "/live": self._live})

    async def running(self) -> None:
        config = self.settings.config
        try:
            await self.server.start(config.admin_host, config.admin_port)
        except OSError as e:
            logger.error(f"regcache: admin endpoint (metrics, health) cannot listen on {config.admin_host}:{config.admin_port}: {e}")

    def done(self) -> None:
        self.server.close()

    async def _metrics(self) -> Answer:
        return Answer(200, EXPOSITION_CONTENT_TYPE, self.metrics.exposition())

    async def _ready(self) -> Answer:
        servers = list(ctx.master.addons.get("proxyserver").servers)
        proxy_serves = bool(servers) and all(server.is_running for server in servers)
        backends = {r.name: r.cache for r in self.settings.config.registries if r.cache}
        return await readiness(proxy_serves, backends)

    async def _live(self) -> Answer:
        return Answer.json(200, {"live": True})


class WebView:
    """In mitmweb (or any tool with a flow view): label flows and keep the list bounded."""

    def load(self, loader) -> None:
        loader.add_option(
            "regcache_web_max_flows", int, int(DEFAULTS["REGCACHE_WEB_MAX_FLOWS"]),
            "Finished flows mitmweb keeps; older ones are dropped so memory stays bounded.",
        )

    def configure(self, updated: set[str]) -> None:
        if "regcache_web_max_flows" in updated and ctx.options.regcache_web_max_flows < 1:
            raise exceptions.OptionsError("regcache_web_max_flows: must be at least 1")
        if "web_host" in updated and "web_password" not in ctx.options.keys() and not is_loopback_host(ctx.options.web_host):
            # mitmproxy before 11.1 has no web_password: its UI would be open to the network.
            raise exceptions.OptionsError(
                "regcache: this mitmweb has no web_password option, so its UI must stay on 127.0.0.1 (web_host)"
            )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self._view() is not None:
            label_flow(flow, flow.metadata.get(TARGET))

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        if (view := self._view()) is not None:  # not `if view`: an empty view is falsy
            label_flow(flow, flow.metadata.get(TARGET), flow.metadata.get(RECORD))
            if drop := finished_flows_beyond(view.resolve("@all"), view.store_count(), ctx.options.regcache_web_max_flows):
                view.remove(drop)

    @staticmethod
    def _view():
        return ctx.master.addons.get("view")


class CredentialRedactor:
    """Blanks Authorization headers on the flow once the request went out.

    Runs last of regcache's addons; mitmweb's flow list (an addon added after the scripts)
    sends each flow update to the UI after it. `responseheaders` comes first for answered requests, so a streamed
    blob's flow is clean for all of its transfer; `error` covers requests that got no answer.
    """

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        redact_credentials(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        redact_credentials(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        redact_credentials(flow)


def pull_record(flow: http.HTTPFlow, now: float) -> PullRecord:
    target: Target | None = flow.metadata.get(TARGET)
    response = flow.response
    counter = flow.metadata.get(BYTE_COUNTER)
    if counter is not None:
        sent = counter.count
    else:
        sent = len(response.raw_content or b"") if response and flow.request.method != "HEAD" else 0
    return PullRecord(
        time=utc_iso(flow.request.timestamp_start),
        client=flow.client_conn.peername[0] if flow.client_conn.peername else "",
        registry=target.registry.name if target else None,
        repository=target.repository if target else None,
        kind=target.kind if target else None,
        reference=target.reference if target else None,
        method=flow.request.method,
        status=response.status_code if response else (502 if flow.error else 0),
        bytes=sent,
        duration_ms=round((now - flow.request.timestamp_start) * 1000),
        backend=target.backend if target else None,
        cache=flow.metadata.get(CACHE_RESULT),
        error=flow.error.msg if flow.error else None,
    )


def make_addons() -> list:
    settings = Settings()
    metrics = Metrics()
    pull_logger = PullLogger(settings)
    return [
        settings,
        MirrorDefaults(settings),
        Router(settings),
        pull_logger,
        Recorder(metrics, [pull_logger.write, metrics.observe]),
        Admin(settings, metrics),
        WebView(),
        CredentialRedactor(),  # last: earlier addons may still read the request as sent
    ]
