"""HitMarker: tells from a cache's upstream fetches whether each client request was a cache hit
or a miss (the bookkeeping is hit_tracking.py's InFlight)."""

from __future__ import annotations

from mitmproxy import http

from ..hit_tracking import InFlight
from ..routing import Target
from .keys import CACHE_RESULT, EGRESS, TARGET, UPSTREAM


class HitMarker:
    """Marks each client manifest or blob request of a cached registry as a hit or a miss."""

    def __init__(self) -> None:
        self.in_flight = InFlight()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        target: Target | None = flow.metadata.get(TARGET)
        if target and target.registry.cache and target.kind in ("manifest", "blob"):
            self.in_flight.started(flow.id, target.registry.name, target.repository, target.reference)
        egress: Target | None = flow.metadata.get(EGRESS)
        if egress is None or UPSTREAM not in flow.metadata:  # not an upstream request, or served from a spool
            return
        if egress.kind == "blob":
            if flow.request.method == "GET":
                self.in_flight.upstream_blob_fetch(egress.registry.name, egress.repository, egress.reference)
        elif egress.kind == "manifest":
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
