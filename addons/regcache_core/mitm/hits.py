"""HitMarker: tells from a cache's upstream fetches whether each client request was a cache hit,
a miss or served stale (the bookkeeping is observe/hits.py's InFlight)."""

from __future__ import annotations

from mitmproxy import http

from ..observe.hits import InFlight, served_content
from .flow_notes import AnsweredBy, note


class HitMarker:
    """Marks each client manifest or blob request of a cached registry as a hit, miss or stale;
    requests already marked (answered from what regcache learnt) keep their mark, and a blob HEAD
    answered from what spools know (mitm/cold_blobs.py) is neither: the cache was not asked. An
    answer that served no content has no mark, whoever set one (a manifest asked of the cache by
    the digest regcache knows, which then fails)."""

    def __init__(self) -> None:
        self.in_flight = InFlight()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow_note = note(flow)
        target = flow_note.target
        if (target and target.registry.cache and target.kind in ("manifest", "blob") and flow_note.cache is None
                and flow_note.answered_by is not AnsweredBy.SPOOL):
            self.in_flight.started(flow.id, target.registry.name, target.repository, target.reference)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        egress = note(flow).egress
        if egress is None or egress.kind not in ("manifest", "blob"):
            return
        digest = flow.response.headers.get("Docker-Content-Digest")
        if egress.kind == "manifest" and ":" not in egress.reference and digest:
            self.in_flight.tag_resolved(egress.registry.name, egress.repository, egress.reference, digest)
        self._upstream_answer(flow, flow.response.status_code)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._upstream_answer(flow, flow.response.status_code if flow.response else None)
        self._finish(flow)

    def _upstream_answer(self, flow: http.HTTPFlow, status: int | None) -> None:
        """Hand an egress flow's answer (None: it got none) to the table, once."""
        flow_note = note(flow)
        egress = flow_note.egress
        if egress is None or egress.kind not in ("manifest", "blob") or flow_note.upstream_answer_seen:
            return
        if flow_note.upstream_request is None:
            return  # served from a spool (SingleFlight): nothing came from upstream for it
        flow_note.upstream_answer_seen = True
        self.in_flight.upstream_answer(egress.registry.name, egress.repository, egress.reference, flow.request.method,
                                       status, blob=egress.kind == "blob")

    def _finish(self, flow: http.HTTPFlow) -> None:
        served = flow.response is not None and served_content(flow.response.status_code)
        result = self.in_flight.finished(flow.id, served)
        if not served:
            note(flow).cache = None
        elif result is not None:
            note(flow).cache = result
