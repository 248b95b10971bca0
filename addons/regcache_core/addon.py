"""The mitmproxy addons. Each hook is short: it reads the flow, calls a plain function
(routing, upstream auth, pull log, ...) and applies the answer. Wiring is explicit, in `make_addons()`.

Two kinds of listener: the client listener on REGCACHE_PORT, and one egress listener per
cached registry, which that registry's cache uses as its upstream. Flows to an upstream (egress
flows, and client flows of uncached registries) get regcache's credentials; the client's own
Authorization header is never passed on.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

from mitmproxy import ctx, http
from mitmproxy.flow import Error

from .cache_watch import InFlight
from .config import Config, ConfigError, Registry, load_config
from .pull_log import PullLog, PullRecord, utc_iso
from .redirects import RedirectSigner, is_redirect_path
from .routing import Refusal, Target, route, route_egress
from .upstream_auth import TokenStore, UpstreamAuth, UpstreamAuthError
from .upstream_signals import UpstreamSignals

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
        }
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

    def __init__(self, settings: Settings, signer: RedirectSigner) -> None:
        self.settings = settings
        self.signer = signer
        self.auth: UpstreamAuth | None = None
        self.signals = UpstreamSignals()

    def configure(self, updated: set[str]) -> None:
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None:
            self.done()
            self.auth = UpstreamAuth(TokenStore(config.data_dir / TOKEN_STORE))

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
        target = flow.metadata.get(TARGET) or flow.metadata.get(EGRESS)
        # Blobs always stream; smaller bodies stream once stream_large_bodies says so.
        if flow.response.stream is True or (target and target.kind == "blob"):
            flow.metadata[BYTE_COUNTER] = flow.response.stream = ByteCounter()

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def _write(self, flow: http.HTTPFlow) -> None:
        record = pull_record(flow, time.time())
        if EGRESS_FOR in flow.metadata:
            # A cache's upstream fetch, not a client's pull: the log keeps one line per client request.
            # No query: a redirect's target URL may carry a CDN's signature.
            what = f"redirect to {flow.request.host}" if REDIRECT in flow.metadata else flow.request.path.partition("?")[0]
            logger.info("upstream fetch for %s: %s %s -> %s, %d bytes%s", flow.metadata[EGRESS_FOR].name,
                        record.method, what, record.status, record.bytes,
                        f", error: {record.error}" if record.error else "")
        elif self.log is not None:
            self.log.write(record)


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
    # Order matters: hooks run in this order, and CacheWatch sets what PullLogger writes.
    return [
        settings,
        MirrorDefaults(settings),
        Router(settings, signer),
        UpstreamCredentials(settings, signer),
        CacheWatch(),
        PullLogger(settings),
    ]
