"""SingleFlight: one upstream fetch per cold blob on the egress listeners. The spools are
spool/table.py's, their downloads spool/download.py's, what blob HEADs are answered spool/blob_heads.py's
(the services' `blobs`, mitm/services.py); this addon sends egress GETs to the spools and
answers the HEADs it can."""

from __future__ import annotations

import logging

from mitmproxy import http

from ..cluster.blob_flights import PeerSpool
from ..dataplane.grants import GrantSigner, grant_key
from ..dataplane.handoff import client_base_url
from ..observe.metrics import Metrics
from ..routing import Target
from ..spool.blob_heads import BlobHead
from ..spool.table import Key, Spool, describe
from .answers import Answer
from .flow_notes import AnsweredBy, note
from .services import Services
from .settings import Settings

logger = logging.getLogger(__name__)


class SingleFlight:
    """Every egress GET of a blob is answered with a 307 to its spool on the data plane, the
    first starting the spool's download; a blob HEAD whose answer is known is answered here.
    Off with the data plane."""

    def __init__(self, settings: Settings, services: Services, metrics: Metrics) -> None:
        self.settings = settings
        self.services = services
        self.metrics = metrics
        self.grants: GrantSigner | None = None

    def configure(self, updated: set[str]) -> None:
        if (config := self.settings.loaded(updated)) is not None and config.dataplane is not None:
            self.grants = GrantSigner(grant_key(config))

    async def answer(self, flow: http.HTTPFlow) -> Answer | None:
        """A cache's blob fetch: a 307 to its spool, or a HEAD's answer that is known."""
        flow_note = note(flow)
        egress = flow_note.egress
        blobs = self.services.blobs
        if blobs is None or egress is None or egress.kind != "blob":
            return None
        if flow.request.method == "HEAD":
            return await self._answer_head(flow, egress)
        base = client_base_url(flow_note.client_host, self.settings.config.dataplane.port)
        if base is None:
            return None  # a Host that is no host name: the fetch goes upstream itself
        if spool := await blobs.follow(egress.registry, egress.repository, egress.reference):
            return self._send_to_spool(egress, spool, base)
        return None

    async def _answer_head(self, flow: http.HTTPFlow, egress: Target) -> Answer | None:
        """A blob HEAD answered from what a spool or a concurrent HEAD knows (blob_heads.py)."""
        key = spool_key(egress)
        head, goes_for_others = await self.services.blobs.head(key)
        if goes_for_others:
            note(flow).head_flight = key
        elif head is not None:
            logger.info("blob HEAD for %s: %s answered from what regcache knows", egress.registry.name, describe(key))
            return head_answer(head)  # not an upstream request: no credentials, nothing counted
        return None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Also for an answer made in `request` (a refusal, a 503): mitmproxy calls this hook then too.
        if (key := _take_head_flight(flow)) is not None:
            self.services.blobs.head_answered(key, flow.response.status_code, flow.response.headers)

    def error(self, flow: http.HTTPFlow) -> None:
        if (key := _take_head_flight(flow)) is not None:
            self.services.blobs.head_answered(key, None, {})

    def _send_to_spool(self, egress: Target, spool: Spool | PeerSpool, base: str) -> Answer:
        """A 307 to this replica's data plane on the host name the cache used for this listener (the
        data plane binds every interface by default), never REGCACHE_DATAPLANE_URL: that is for
        clients; or to the data plane of the replica downloading the blob, at its URL."""
        grant = self.grants.grant("spool", egress.registry.name, egress.repository, egress.reference, spool.size)
        self.metrics.spool_follower(egress.registry.name)
        if isinstance(spool, PeerSpool):
            base, where = spool.dataplane, f"the data plane of the replica downloading it, {spool.dataplane}"
        else:
            where = f"the data plane ({spool.state.value})"
        logger.info("spool follower for %s: %s sent to %s, %d bytes", egress.registry.name, describe(spool.key),
                    where, spool.size)
        # Not an upstream request: no credentials, no upstream fetch counted, no miss (the
        # download counts its own).
        return Answer(http.Response.make(307, b"", {"Location": self.grants.url(base, grant)}), AnsweredBy.SPOOL)


def _take_head_flight(flow: http.HTTPFlow) -> Key | None:
    flow_note = note(flow)
    key, flow_note.head_flight = flow_note.head_flight, None
    return key


def head_answer(head: BlobHead) -> Answer:
    """A blob HEAD answered from what regcache knows of the blob."""
    response = http.Response.make(200, b"", head.headers())
    response.headers["Content-Length"] = str(head.size)  # what a GET would send; make() set 0
    return Answer(response, AnsweredBy.SPOOL)


def spool_key(target: Target) -> Key:
    return target.registry.name, target.repository, target.reference
