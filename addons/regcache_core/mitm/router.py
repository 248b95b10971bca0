"""Router: sends each request to its registry's cache or upstream, or refuses it (see routing.py);
`send_to` points a flow at where a decision sends it."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

from ..config import Registry, is_local
from ..access.egress import EgressGuard
from ..observe.log_throttle import LogThrottle, held_back
from ..upstream.redirects import RedirectSigner, is_redirect_path, resolve_destination
from ..routing import Refusal, Target, refuse_malformed, refuse_method, route, route_egress
from .answers import Answer, body_follows, json_answer, multiplexed, refusal_answer
from .flow_notes import note
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

    async def route(self, flow: http.HTTPFlow) -> Answer | None:
        """Point the flow at its backend and note where it goes (FlowNote's target, egress,
        upstream, redirect), or answer it: a refusal, or a ping answered here."""
        try:
            return await self._route(flow)
        except Exception:
            # Never let a request fall through to the placeholder destination: answer it.
            logger.exception("regcache could not route %s %s", flow.request.method, flow.request.path.partition("?")[0])
            return refusal_answer(flow.request.method, Refusal(500, "UNKNOWN", "regcache could not route this request; see its log"))

    async def _route(self, flow: http.HTTPFlow) -> Answer | None:
        request = flow.request
        # A client's credentials are never ours to pass on; upstreams get ours.
        request.headers.pop("Authorization", None)
        if refusal := refuse_malformed(method_as_sent(request), request.http_version, request.path, body_follows(request),
                                       multiplexed(flow)):
            return refusal_answer(request.method, refusal)
        egress_for = self.settings.config.egress_registry(flow.client_conn.proxy_mode.listen_port())
        if egress_for is not None:
            note(flow).egress_for = egress_for
            client = flow.client_conn.peername[0]
            if not await self.guard.allows(egress_for, client):
                if (held := self.refusals.allow(client)) is not None:
                    logger.warning("refused %s on the egress listener of %s: it serves that registry's cache only%s",
                                   client, egress_for.name, held_back(held))
                return refusal_answer(request.method, Refusal(403, "DENIED", f"this listener serves the cache of {egress_for.name} only"))
        if is_redirect_path(request.path):
            return await self._follow_redirect(flow)
        if egress_for is not None:
            return self._route_egress(flow, egress_for)
        return self._route_client(flow)

    def _route_client(self, flow: http.HTTPFlow) -> Answer | None:
        request = flow.request
        decision = route(
            self.settings.config,
            method_as_sent(request),
            request.host_header or "",
            request.path,
            proxy_form=request.first_line_format != "relative" and not multiplexed(flow),
        )
        if isinstance(decision, Refusal):
            return refusal_answer(request.method, decision)
        flow_note = note(flow)
        flow_note.target = decision
        if decision.kind == "ping" and decision.registry.cache:
            # Nothing to ask the cache: it would answer the same 200, one hop later.
            return json_answer(request.method, 200, b"{}", API_VERSION)
        if decision.goes_upstream:
            flow_note.upstream = decision
        send_to(request, decision.backend, decision.path)
        return None

    def _route_egress(self, flow: http.HTTPFlow, registry: Registry) -> Answer | None:
        """A cache asks its upstream: answer its ping ourselves (so it starts while the upstream is
        down, and never sees an upstream's challenge), pass pulls on, refuse the rest."""
        decision = route_egress(registry, method_as_sent(flow.request), flow.request.path)
        if isinstance(decision, Refusal):
            return refusal_answer(flow.request.method, decision)
        if decision.kind == "ping":
            # registry:2 pings its upstream before every request until a ping has named a
            # challenge, then never again. A Basic one costs nothing: it holds no credentials
            # to answer it with, so its requests come as before and we add ours.
            note(flow).egress = decision
            return json_answer(flow.request.method, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"regcache adds the credentials"}]}',
                               {**API_VERSION, "WWW-Authenticate": EGRESS_CHALLENGE})
        note(flow).egress = note(flow).upstream = decision
        send_to(flow.request, registry.upstream, decision.path)
        return None

    async def _follow_redirect(self, flow: http.HTTPFlow) -> Answer | None:
        method = flow.request.method
        if refusal := refuse_method(method_as_sent(flow.request)):
            return refusal_answer(method, refusal)
        redirect = self.signer.target(flow.request.path)
        registry = redirect and self.settings.config.registry(redirect.registry)
        if registry is None:
            return refusal_answer(method, Refusal(403, "DENIED", "not a redirect issued by this regcache, or it expired"))
        parts = urlsplit(redirect.url)
        # Signing checked the URL; a name may resolve to this machine though.
        destination = await resolve_destination(parts.hostname)
        if not is_local(registry.upstream) and destination.internal:
            logger.warning("refused a redirect of %s's upstream to %s: it is this machine or its link", registry.name, parts.hostname)
            return refusal_answer(method, Refusal(403, "DENIED", f"redirect target {parts.hostname} is an internal address"))
        target = Target(registry, redirect.kind, redirect.repository, redirect.reference, redirect.url)
        flow_note = note(flow)
        flow_note.redirect = target
        if flow_note.egress_for is None:
            # A client follows it (an uncached registry): its pull log line names that blob.
            flow_note.target = target
        send_to(flow.request, f"{parts.scheme}://{parts.netloc}", parts._replace(scheme="", netloc="").geturl())
        if destination.address is not None:
            self._checked.setdefault(flow.client_conn.id, {})[(flow.request.host, flow.request.port)] = destination.address
        return None


def method_as_sent(request: http.Request) -> str:
    """The method's own bytes: `Request.method` is an upper-cased copy, but a backend gets these."""
    return request.data.method.decode("ascii", "backslashreplace")


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


def send_to(request: http.Request, base_url: str, path: str) -> None:
    backend = urlsplit(base_url)
    request.scheme = backend.scheme
    request.host = backend.hostname
    request.port = backend.port or (443 if backend.scheme == "https" else 80)
    request.path = path
