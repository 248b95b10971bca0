"""RequestPath: what regcache does with each request as its head arrives, in one place.

Each step is a plain call that returns an Answer or None (None: go on); the first answer is
sent. What a request becomes when nothing answers it here: routing pointed it at its cache or
upstream, and the `request` hooks (UpstreamDeadlines, UpstreamCredentials) give an upstream
request its deadline and our credentials.
"""

from __future__ import annotations

from mitmproxy import http

from .answers import Answer, send_answer
from .client_access import ClientAccess
from .cold_blobs import ColdBlobs
from .dataplane import DataPlaneHandoff
from .flow_notes import note
from .manifest_responder import ManifestResponder
from .router import Router
from .single_flight import SingleFlight


class RequestPath:
    def __init__(self, access: ClientAccess, router: Router, handoff: DataPlaneHandoff, single_flight: SingleFlight,
                 cold_blobs: ColdBlobs, manifests: ManifestResponder) -> None:
        self.access = access
        self.router = router
        self.handoff = handoff
        self.single_flight = single_flight
        self.cold_blobs = cold_blobs
        self.manifests = manifests

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if (answer := await self.decide(flow)) is not None:
            send_answer(flow, answer)

    async def decide(self, flow: http.HTTPFlow) -> Answer | None:
        flow_note = note(flow)
        # Before routing rewrites them: 307s to the data plane go to the host name the client (or
        # cache) used, and mitmweb shows the request as it came (mitm/web.py).
        flow_note.client_host = flow.request.host_header or ""
        flow_note.client_path = flow.request.path
        # Who may ask, then where it goes (a refusal, or a ping answered here).
        if answer := await self.access.check(flow) or await self.router.route(flow):
            return answer
        if flow_note.egress is not None:
            # A cache asks its upstream: a blob fetch goes to its spool, a blob HEAD may be known.
            return await self.single_flight.answer(flow)
        if flow_note.target is not None:
            # A client: a warm blob from the data plane (a small one from here), a cold one
            # following its download (a HEAD of it answered as the upstream answers), a cached
            # registry's manifest from memory; else its cache or upstream answers (unless the
            # object store it keeps blobs in is down).
            return (await self.handoff.answer(flow) or await self.cold_blobs.answer(flow)
                    or await self.manifests.answer(flow) or self.handoff.store_down(flow))
        return None
