"""Router: sends each request to its registry's cache or upstream, or refuses it (see routing.py);
`refuse` and `send_to` apply such a decision to a flow."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from mitmproxy import http

from ..config import Registry, is_local
from ..egress_guard import EgressGuard
from ..redirects import RedirectSigner, is_redirect_path, resolves_internal
from ..routing import Refusal, Target, refuse_method, route, route_egress
from .keys import CLIENT_HOST, EGRESS, EGRESS_FOR, REDIRECT, TARGET, UPSTREAM
from .settings import Settings

logger = logging.getLogger(__name__)


class Router:
    """Sends each request to its registry's cache or upstream (or a redirect's target), or refuses it."""

    def __init__(self, settings: Settings, signer: RedirectSigner) -> None:
        self.settings = settings
        self.signer = signer
        self.guard = EgressGuard()

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
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
        # Before routing rewrites it: 307s to the data plane go to the host name the client (or
        # cache) used.
        flow.metadata[CLIENT_HOST] = request.host_header or ""
        egress_for = self.settings.config.egress_registry(flow.client_conn.proxy_mode.listen_port())
        if egress_for is not None:
            flow.metadata[EGRESS_FOR] = egress_for
            client = flow.client_conn.peername[0]
            if not await self.guard.allows(egress_for, client):
                logger.warning("refused %s on the egress listener of %s: it serves that registry's cache only",
                               client, egress_for.name)
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
            request.method,
            request.host_header or "",
            request.path,
            proxy_form=request.first_line_format != "relative" and not request.is_http2,
        )
        if isinstance(decision, Refusal):
            refuse(flow, decision)
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
            refuse(flow, decision)
        elif decision.kind == "ping":
            flow.response = http.Response.make(200, b"{}", {
                "Content-Type": "application/json", "Docker-Distribution-API-Version": "registry/2.0"})
        else:
            flow.metadata[EGRESS] = flow.metadata[UPSTREAM] = decision
            send_to(flow.request, registry.upstream, decision.path)

    async def _follow_redirect(self, flow: http.HTTPFlow) -> None:
        if refusal := refuse_method(flow.request.method):
            refuse(flow, refusal)
            return
        redirect = self.signer.target(flow.request.path)
        registry = redirect and self.settings.config.registry(redirect.registry)
        if registry is None:
            refuse(flow, Refusal(403, "DENIED", "not a redirect issued by this regcache, or it expired"))
            return
        parts = urlsplit(redirect.url)
        # Signing checked the URL; a name may resolve to this machine though.
        if not is_local(registry.upstream) and await resolves_internal(parts.hostname):
            logger.warning("refused a redirect of %s's upstream to %s: it is this machine or its link", registry.name, parts.hostname)
            refuse(flow, Refusal(403, "DENIED", f"redirect target {parts.hostname} is an internal address"))
            return
        target = Target(registry, redirect.kind, redirect.repository, redirect.reference, redirect.url)
        flow.metadata[REDIRECT] = target
        if EGRESS_FOR not in flow.metadata:
            # A client follows it (an uncached registry): its pull log line names that blob.
            flow.metadata[TARGET] = target
        send_to(flow.request, f"{parts.scheme}://{parts.netloc}", parts._replace(scheme="", netloc="").geturl())


def refuse(flow: http.HTTPFlow, refusal: Refusal) -> None:
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
