"""Router: sends each request to its registry's cache or upstream, or refuses it (see routing.py);
`refuse` and `send_to` apply such a decision to a flow."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import server_hooks
from mitmproxy.net.http.http1 import assemble_response, expected_http_body_size

from ..config import Registry, is_local
from ..access.egress import EgressGuard
from ..observe.log_throttle import LogThrottle, held_back
from ..upstream.redirects import RedirectSigner, is_redirect_path, resolve_destination
from ..routing import PULL_METHODS, Refusal, Target, refuse_malformed, refuse_method, route, route_egress
from .keys import ANSWERED_HERE, CLIENT_HOST, CLIENT_PATH, EGRESS, EGRESS_FOR, REDIRECT, TARGET, UPSTREAM
from .settings import Settings

logger = logging.getLogger(__name__)
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
EGRESS_CHALLENGE = 'Basic realm="regcache egress"'


class Router:
    """Sends each request to its registry's cache or upstream (or a redirect's target), or refuses it."""

    def __init__(self, settings: Settings, signer: RedirectSigner) -> None:
        self.settings = settings
        self.signer = signer
        self.guard = EgressGuard()
        self.refusals = LogThrottle()  # egress refusals: one line per source a minute
        # client connection id -> {(redirect target host, port): the address checked for it}
        self._checked: dict[str, dict[tuple[str, int], str]] = {}

    def running(self) -> None:
        logging.getLogger("mitmproxy.proxy.server").addFilter(trailers_crash_as_one_line)

    def done(self) -> None:
        logging.getLogger("mitmproxy.proxy.server").removeFilter(trailers_crash_as_one_line)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """A redirect target is connected to at the address checked in _follow_redirect (the
        request keeps the name for Host and TLS's SNI and certificate check)."""
        address = self._checked.get(data.client.id, {}).get(data.server.address)
        if address is not None:
            data.server.address = (address, data.server.address[1])

    def client_disconnected(self, client: connection.Client) -> None:
        self._checked.pop(client.id, None)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Before routing rewrites them: 307s to the data plane go to the host name the client (or
        # cache) used, and mitmweb shows the request as it came (mitm/web.py).
        flow.metadata[CLIENT_HOST] = flow.request.host_header or ""
        flow.metadata[CLIENT_PATH] = flow.request.path
        if flow.response is not None:
            return  # answered already (ClientAccess refused it)
        try:
            await self._route(flow)
        except Exception:
            # Never let a request fall through to the placeholder destination: answer it.
            logger.exception("regcache could not route %s %s", flow.request.method, flow.request.path.partition("?")[0])
            refuse(flow, Refusal(500, "UNKNOWN", "regcache could not route this request; see its log"))

    async def _route(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        # A client's credentials are never ours to pass on; upstreams get ours.
        request.headers.pop("Authorization", None)
        if refusal := refuse_malformed(method_as_sent(request), request.http_version, request.path, body_follows(request),
                                       multiplexed(flow)):
            refuse(flow, refusal)
            return
        egress_for = self.settings.config.egress_registry(flow.client_conn.proxy_mode.listen_port())
        if egress_for is not None:
            flow.metadata[EGRESS_FOR] = egress_for
            client = flow.client_conn.peername[0]
            if not await self.guard.allows(egress_for, client):
                if (held := self.refusals.allow(client)) is not None:
                    logger.warning("refused %s on the egress listener of %s: it serves that registry's cache only%s",
                                   client, egress_for.name, held_back(held))
                refuse(flow, Refusal(403, "DENIED", f"this listener serves the cache of {egress_for.name} only"))
                return
        if is_redirect_path(request.path):
            await self._follow_redirect(flow)
        elif egress_for is not None:
            self._route_egress(flow, egress_for)
        else:
            self._route_client(flow)

    def _route_client(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        decision = route(
            self.settings.config,
            method_as_sent(request),
            request.host_header or "",
            request.path,
            proxy_form=request.first_line_format != "relative" and not multiplexed(flow),
        )
        if isinstance(decision, Refusal):
            refuse(flow, decision)
            return
        flow.metadata[TARGET] = decision
        if decision.kind == "ping" and decision.registry.cache:
            # Nothing to ask the cache: it would answer the same 200, one hop later.
            answer(flow, 200, b"{}", API_VERSION)
            return
        if decision.goes_upstream:
            flow.metadata[UPSTREAM] = decision
        send_to(request, decision.backend, decision.path)

    def _route_egress(self, flow: http.HTTPFlow, registry: Registry) -> None:
        """A cache asks its upstream: answer its ping ourselves (so it starts while the upstream is
        down, and never sees an upstream's challenge), pass pulls on, refuse the rest."""
        decision = route_egress(registry, method_as_sent(flow.request), flow.request.path)
        if isinstance(decision, Refusal):
            refuse(flow, decision)
        elif decision.kind == "ping":
            # registry:2 pings its upstream before every request until a ping has named a
            # challenge, then never again. A Basic one costs nothing: it holds no credentials
            # to answer it with, so its requests come as before and we add ours.
            flow.metadata[EGRESS] = decision
            answer(flow, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"regcache adds the credentials"}]}',
                   {**API_VERSION, "WWW-Authenticate": EGRESS_CHALLENGE})
        else:
            flow.metadata[EGRESS] = flow.metadata[UPSTREAM] = decision
            send_to(flow.request, registry.upstream, decision.path)

    async def _follow_redirect(self, flow: http.HTTPFlow) -> None:
        if refusal := refuse_method(method_as_sent(flow.request)):
            refuse(flow, refusal)
            return
        redirect = self.signer.target(flow.request.path)
        registry = redirect and self.settings.config.registry(redirect.registry)
        if registry is None:
            refuse(flow, Refusal(403, "DENIED", "not a redirect issued by this regcache, or it expired"))
            return
        parts = urlsplit(redirect.url)
        # Signing checked the URL; a name may resolve to this machine though.
        destination = await resolve_destination(parts.hostname)
        if not is_local(registry.upstream) and destination.internal:
            logger.warning("refused a redirect of %s's upstream to %s: it is this machine or its link", registry.name, parts.hostname)
            refuse(flow, Refusal(403, "DENIED", f"redirect target {parts.hostname} is an internal address"))
            return
        target = Target(registry, redirect.kind, redirect.repository, redirect.reference, redirect.url)
        flow.metadata[REDIRECT] = target
        if EGRESS_FOR not in flow.metadata:
            # A client follows it (an uncached registry): its pull log line names that blob.
            flow.metadata[TARGET] = target
        send_to(flow.request, f"{parts.scheme}://{parts.netloc}", parts._replace(scheme="", netloc="").geturl())
        if destination.address is not None:
            self._checked.setdefault(flow.client_conn.id, {})[(flow.request.host, flow.request.port)] = destination.address


def method_as_sent(request: http.Request) -> str:
    """The method's own bytes: `Request.method` is an upper-cased copy, but a backend gets these."""
    return request.data.method.decode("ascii", "backslashreplace")


def body_follows(request: http.Request) -> bool:
    """True when the request announced a body that mitmproxy has not read yet."""
    if request.raw_content is not None:
        return False
    try:
        return bool(request.stream) or expected_http_body_size(request) != 0
    except ValueError:
        return True  # malformed framing: mitmproxy refuses it before any hook


def refuse(flow: http.HTTPFlow, refusal: Refusal) -> None:
    headers = {}
    if refusal.status == 405:
        headers["Allow"] = ", ".join(PULL_METHODS)  # RFC 9110: a 405 says which methods are allowed
    if refusal.challenge:
        headers["WWW-Authenticate"] = refusal.challenge
    answer(flow, refusal.status, refusal.body(), headers, close=refusal.close)


def answer(flow: http.HTTPFlow, status: int, body: bytes, headers: dict[str, str] | None = None,
           close: bool = False) -> None:
    """Answer a flow ourselves with a JSON body; a HEAD gets its headers only. mitmproxy would
    send the body after a HEAD's answer too, and the client would read it as the next answer on
    that connection."""
    head = flow.request.method == "HEAD"
    flow.response = http.Response.make(status, b"" if head else body, {"Content-Type": "application/json", **(headers or {})})
    flow.response.headers["Content-Length"] = str(len(body))
    flow.metadata[ANSWERED_HERE] = True
    unread_body = body_follows(flow.request)
    if (close or unread_body) and not multiplexed(flow):
        flow.response.headers["Connection"] = "close"  # HTTP/2 has no such header
    if unread_body:
        send_before_the_body(flow)


def send_before_the_body(flow: http.HTTPFlow) -> None:
    """Send the flow's answer now and close the connection, leaving the request body unread.

    mitmproxy answers only after reading a whole body, buffered (up to stream_large_bodies),
    crashes the connection when a body it streams meets an answer, and when a chunked body ends
    in trailers. So the answer is written on the client's connection here (HTTP/1 only, where
    nothing else is being written while a request is read) and the flow is killed, which makes
    mitmproxy close the connection (HTTP/2: reset the stream). `flow.response` stays set, for
    the pull log.
    """
    writer = client_writer(flow)
    if writer is not None:
        writer.write(assemble_response(flow.response))
        writer.close()
    flow.kill()


def trailers_crash_as_one_line(record: logging.LogRecord) -> bool:
    """A log filter for mitmproxy's connection handler. A chunked body whose trailers came in
    the same read as the request head is parsed by mitmproxy right after `requestheaders`, even
    when the flow was answered and killed there, and mitmproxy 11 and 12 raise on trailers: by
    then the client has its 400 and its connection is closed, so a line says it all."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, NotImplementedError) and "trailers" in str(error):
        record.msg, record.args, record.exc_info = "a request with trailers was refused (400) and its connection closed", (), None
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def client_writer(flow: http.HTTPFlow) -> asyncio.StreamWriter | None:
    """The stream writer of the flow's client connection; None where it carries other streams
    too (HTTP/2, HTTP/3: mitmproxy resets this one when the flow is killed)."""
    if multiplexed(flow):
        return None
    return connection_writer(flow.client_conn)


def connection_writer(client: connection.Client) -> asyncio.StreamWriter | None:
    """A client connection's stream writer (`Proxyserver.connections` and the handler's
    `transports`: the same in mitmproxy 11 and 12); None where there is none (tests, gone)."""
    master = getattr(ctx, "master", None)
    proxyserver = master.addons.get("proxyserver") if master else None
    handler = proxyserver.connections.get(client.id) if proxyserver else None
    transport = handler.transports.get(client) if handler else None
    writer = transport.writer if transport else None
    return writer if isinstance(writer, asyncio.StreamWriter) else None


def multiplexed(flow: http.HTTPFlow) -> bool:
    """HTTP/2 or 3, by what the connection negotiated (ALPN), never by the version a request line
    claims: `request.is_http2` is true for `GET / HTTP/2.0` sent over HTTP/1."""
    return flow.client_conn.alpn in (b"h2", b"h3")


def send_to(request: http.Request, base_url: str, path: str) -> None:
    backend = urlsplit(base_url)
    request.scheme = backend.scheme
    request.host = backend.hostname
    request.port = backend.port or (443 if backend.scheme == "https" else 80)
    request.path = path
