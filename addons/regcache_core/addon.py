"""The mitmproxy addons. Each hook is short: it reads the flow, calls a plain function
(routing, upstream auth, pull log, metrics, mitmweb labels) and applies the answer. Wiring is explicit, in `make_addons()`.

Two kinds of listener: the client listener on REGCACHE_PORT, and one egress listener per
cached registry, which that registry's cache uses as its upstream. Flows to an upstream (egress
flows, and client flows of uncached registries) get regcache's credentials; the client's own
Authorization header is never passed on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy.flow import Error

from .admin import AdminServer, Answer, readiness
from .cache_watch import InFlight
from .config import DEFAULTS, Config, ConfigError, Registry, is_loopback_host, load_config
from .metrics import EXPOSITION_CONTENT_TYPE, Metrics
from .pull_log import PullLog, PullRecord, utc_iso
from .redirects import RedirectSigner, is_redirect_path
from .routing import Refusal, Target, route, route_egress
from .upstream_auth import TokenStore, UpstreamAuth, UpstreamAuthError
from .upstream_signals import UpstreamSignals
from .web import finished_flows_beyond, label_flow

logger = logging.getLogger(__name__)

# Reverse mode needs a destination, but every request gets its own from routing, so this
# placeholder is never contacted (connection_strategy=lazy keeps mitmproxy from dialling it).
PLACEHOLDER_DESTINATION = "http://127.0.0.1:1"
TARGET = "regcache.target"  # flow.metadata key: the routing decision
BYTE_COUNTER = "regcache.bytes"  # flow.metadata key: counts a streamed body
CACHE_RESULT = "regcache.cache"  # flow.metadata key: "hit" or "miss", set once the cache's upstream use is known
EGRESS_FOR = "regcache.egress_for"  # flow.metadata key: the Registry whose egress listener the flow came in on
EGRESS = "regcache.egress"  # flow.metadata key: the Target a cache asked its upstream for
UPSTREAM = "regcache.upstream"  # flow.metadata key: the Target of a flow sent upstream with our credentials
REDIRECT = "regcache.redirect"  # flow.metadata key: the URL of an upstream redirect we follow
INJECTED = "regcache.injected"  # flow.metadata key: the Authorization header is ours
REDACTED = "<redacted by regcache>"
TOKEN_STORE = "upstream-tokens"  # folder in the data dir
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
                # Logged, not raised as OptionsError: mitmproxy would print a traceback for a
                # script's OptionsError, where one line says it all. An error logged during
                # start-up makes mitmproxy exit (its errorcheck addon); later, the last good
                # config stays in force.
                logger.error(f"regcache: {e}")


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
        config = self.settings.config
        egress = [
            f"reverse:{PLACEHOLDER_DESTINATION}@{config.egress_host}:{r.egress_port}"
            for r in config.registries
            if r.egress_port is not None
        ]
        wanted = {
            "mode": [f"reverse:{PLACEHOLDER_DESTINATION}@{config.port}", *egress],
            "keep_host_header": True,  # routing reads the client's Host header
            "connection_strategy": "lazy",
            "stream_large_bodies": "1m",  # layers are streamed, never held in memory
            "regcache_web_max_flows": config.web_max_flows,
        }
        if "web_columns" in ctx.options.keys():  # mitmweb: show each flow's regcache label
            wanted["web_columns"] = [*ctx.options.web_columns, "comment"]
        changes = {name: value for name, value in wanted.items() if not ctx.options.has_changed(name)}
        if changes:
            ctx.options.update(**changes)


class Router:
    """Sends each request to its registry's cache or upstream (or a redirect's target), or refuses it."""

    def __init__(self, settings: Settings, signer: RedirectSigner) -> None:
        self.settings = settings
        self.signer = signer

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        # A client's credentials are never ours to pass on; upstreams get ours.
        request.headers.pop("Authorization", None)
        egress_for = self.settings.config.egress_registry(flow.client_conn.proxy_mode.listen_port())
        if egress_for is not None:
            flow.metadata[EGRESS_FOR] = egress_for
        if is_redirect_path(request.path):
            self._follow_redirect(flow)
        elif egress_for is not None:
            self._route_egress(flow, egress_for)
        else:
            self._route_client(flow)

    def _route_client(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        decision = route(
            self.settings.config,
            request.method,
            request.host_header or "",
            request.path,
            proxy_form=request.first_line_format != "relative" and not request.is_http2,
        )
        if isinstance(decision, Refusal):
            answer(flow, decision)
            return
        flow.metadata[TARGET] = decision
        if decision.registry.cache is None:
            flow.metadata[UPSTREAM] = decision
        send_to(request, decision.backend, decision.path)

    def _route_egress(self, flow: http.HTTPFlow, registry: Registry) -> None:
        """A cache asks its upstream: answer its ping ourselves (so it starts while the upstream is
        down, and never sees an upstream's challenge), pass pulls on, refuse the rest."""
        decision = route_egress(registry, flow.request.method, flow.request.path)
        if isinstance(decision, Refusal):
            answer(flow, decision)
        elif decision.kind == "ping":
            flow.response = http.Response.make(200, b"{}", {
                "Content-Type": "application/json", "Docker-Distribution-API-Version": "registry/2.0"})
        else:
            flow.metadata[EGRESS] = flow.metadata[UPSTREAM] = decision
            send_to(flow.request, registry.upstream, decision.path)

    def _follow_redirect(self, flow: http.HTTPFlow) -> None:
        target = self.signer.target(flow.request.path)
        if target is None:
            answer(flow, Refusal(403, "DENIED", "not a redirect issued by this regcache"))
            return
        flow.metadata[REDIRECT] = target
        parts = urlsplit(target)
        send_to(flow.request, f"{parts.scheme}://{parts.netloc}", parts._replace(scheme="", netloc="").geturl())


def answer(flow: http.HTTPFlow, refusal: Refusal) -> None:
    if flow.request.stream or "transfer-encoding" in flow.request.headers:
        # mitmproxy answers only after reading the whole request body, and crashes the
        # connection if a body it streams (over stream_large_bodies, or chunked and
        # growing past it) meets a response: drop such a request instead.
        flow.kill()
        return
    flow.response = http.Response.make(refusal.status, refusal.body(), {"Content-Type": "application/json"})


def send_to(request: http.Request, base_url: str, path: str) -> None:
    backend = urlsplit(base_url)
    request.scheme = backend.scheme
    request.host = backend.hostname
    request.port = backend.port or (443 if backend.scheme == "https" else 80)
    request.path = path


class UpstreamCredentials:
    """Adds our Authorization to flows sent upstream, and cleans up what upstreams answer:
    no challenge reaches a client or cache, redirects are followed through us, and the header we
    added is redacted once the request is sent (mitmweb keeps flows)."""

    def __init__(self, settings: Settings, signer: RedirectSigner, metrics: Metrics) -> None:
        self.settings = settings
        self.signer = signer
        self.metrics = metrics
        self.auth: UpstreamAuth | None = None
        self.signals = UpstreamSignals(metrics)

    def configure(self, updated: set[str]) -> None:
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None:
            self.done()
            self.auth = UpstreamAuth(TokenStore(config.data_dir / TOKEN_STORE), on_token_fetch=self.metrics.token_fetch)

    def done(self) -> None:
        if self.auth:
            self.auth.store.close()

    async def request(self, flow: http.HTTPFlow) -> None:
        # In `request`, after mitmweb's view took its copy at `requestheaders`.
        target: Target | None = flow.metadata.get(UPSTREAM)
        if target is None or flow.response is not None:
            return
        try:
            authorization = await self.auth.authorization(target.registry, target.repository)
        except UpstreamAuthError as e:
            code = "UNAUTHORIZED" if e.status == 401 else "UNAVAILABLE"
            answer(flow, Refusal(e.status, code, str(e)))
            return
        if authorization:
            flow.request.headers["Authorization"] = authorization
            flow.metadata[INJECTED] = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)
        target: Target | None = flow.metadata.get(UPSTREAM)
        if target is None and REDIRECT not in flow.metadata:
            return
        response = flow.response
        if target is not None:
            self.signals.observe(target.registry.name, response.status_code, response.headers)
            if response.status_code == 401:
                self.auth.refused(target.registry, target.repository)
            elif response.status_code < 400:
                self.auth.accepted(target.registry)
        # Clients and caches must not start a token dance of their own around us.
        response.headers.pop("WWW-Authenticate", None)
        if response.status_code in (301, 302, 303, 307, 308) and "Location" in response.headers:
            location = self.signer.location(flow.request.url, response.headers["Location"])
            if location is None:
                del response.headers["Location"]
            else:
                response.headers["Location"] = location

    def error(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    @staticmethod
    def _redact(flow: http.HTTPFlow) -> None:
        if flow.metadata.pop(INJECTED, False):
            flow.request.headers["Authorization"] = REDACTED


class CacheWatch:
    """Marks each client manifest or blob request of a cached registry as a hit or a miss."""

    def __init__(self) -> None:
        self.in_flight = InFlight()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        target: Target | None = flow.metadata.get(TARGET)
        if target and target.registry.cache and target.kind in ("manifest", "blob"):
            self.in_flight.started(flow.id, target.registry.name, target.repository, target.reference)
        egress: Target | None = flow.metadata.get(EGRESS)
        if egress and egress.kind in ("manifest", "blob"):
            self.in_flight.upstream_request(egress.registry.name, egress.repository, egress.reference, flow.request.method)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        egress: Target | None = flow.metadata.get(EGRESS)
        digest = flow.response.headers.get("Docker-Content-Digest")
        if egress and egress.kind == "manifest" and ":" not in egress.reference and digest:
            self.in_flight.tag_resolved(egress.registry.name, egress.repository, egress.reference, digest)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        if result := self.in_flight.finished(flow.id):
            flow.metadata[CACHE_RESULT] = result


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
        target = flow.metadata.get(TARGET) or flow.metadata.get(EGRESS)
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
        if (upstream := upstream_registry(flow)) is not None:
            self.metrics.upstream_result(upstream, record.status if flow.response else None)
        if EGRESS_FOR in flow.metadata:
            # A cache's upstream fetch, not a client's pull: the log keeps one line per client request.
            log_upstream_fetch(flow, record)
            return
        for sink in self.sinks:
            sink(record)


def upstream_registry(flow: http.HTTPFlow) -> str | None:
    """The registry whose upstream this flow went to with our credentials, if it did."""
    if (target := flow.metadata.get(UPSTREAM)) is not None:
        return target.registry.name
    if REDIRECT in flow.metadata and (registry := flow.metadata.get(EGRESS_FOR)) is not None:
        return registry.name
    return None


def log_upstream_fetch(flow: http.HTTPFlow, record: PullRecord) -> None:
    # No query: a redirect's target URL may carry a CDN's signature.
    what = f"redirect to {flow.request.host}" if REDIRECT in flow.metadata else flow.request.path.partition("?")[0]
    logger.info("upstream fetch for %s: %s %s -> %s, %d bytes%s", flow.metadata[EGRESS_FOR].name,
                record.method, what, record.status, record.bytes, f", error: {record.error}" if record.error else "")


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
            label_flow(flow, *_labelled(flow))

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        if (view := self._view()) is not None:  # not `if view`: an empty view is falsy
            label_flow(flow, *_labelled(flow), flow.metadata.get(RECORD))
            if drop := finished_flows_beyond(view.resolve("@all"), view.store_count(), ctx.options.regcache_web_max_flows):
                view.remove(drop)

    @staticmethod
    def _view():
        return ctx.master.addons.get("view")


def _labelled(flow: http.HTTPFlow) -> tuple[Target | None, bool]:
    """What a flow's label names: its client request, or the upstream fetch of a cache."""
    if (egress := flow.metadata.get(EGRESS)) is not None:
        return egress, True
    return flow.metadata.get(TARGET), False



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
    signer = RedirectSigner()
    metrics = Metrics()
    pull_logger = PullLogger(settings)
    # Order matters: hooks run in this order. UpstreamCredentials redacts what it injected
    # before mitmweb's view (added after the scripts) sends a flow update; CacheWatch sets the
    # hit/miss that Recorder hands to the pull log and metrics.
    return [
        settings,
        MirrorDefaults(settings),
        Router(settings, signer),
        UpstreamCredentials(settings, signer, metrics),
        CacheWatch(),
        pull_logger,
        Recorder(metrics, [pull_logger.write, metrics.observe]),
        Admin(settings, metrics),
        WebView(),
    ]
