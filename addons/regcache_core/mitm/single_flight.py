"""SingleFlight: one upstream fetch per cold blob on the egress listeners. The spools are
spool.py's, their downloads spool_download.py's, what blob HEADs are answered blob_heads.py's;
this addon sends egress GETs to the spools and answers the HEADs it can."""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import http

from ..dataplane.grants import GrantSigner, load_or_create_key
from ..dataplane.handoff import client_base_url
from ..observe.metrics import Metrics
from ..routing import Target
from ..spool.blob_heads import BlobHead, HeadFlights
from ..spool.table import SPOOL_DIR, Key, Spool, SpoolTable, describe
from ..spool.download import SpoolDownloads
from ..upstream.state import UpstreamState
from .keys import CLIENT_HOST, EGRESS, HEAD_FLIGHT, SPOOL_FOLLOWER, UPSTREAM
from .settings import Settings
from .upstream import UpstreamCredentials

logger = logging.getLogger(__name__)


class SingleFlight:
    """Every egress GET of a blob is answered with a 307 to its spool on the data plane, the
    first starting the spool's download; a blob HEAD whose answer is known is answered here.
    Off with the data plane."""

    def __init__(self, settings: Settings, metrics: Metrics, credentials: UpstreamCredentials, state: UpstreamState,
                 blob_fetched: Callable[[str, str, str], None]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.credentials = credentials
        self.state = state
        self.blob_fetched = blob_fetched  # HitMarker's InFlight.upstream_blob_fetch
        self.downloads: SpoolDownloads | None = None
        self.heads: HeadFlights | None = None
        self.grants: GrantSigner | None = None

    def configure(self, updated: set[str]) -> None:
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None:
            self.done()
            if config.dataplane is not None:
                # UpstreamCredentials, configured before this addon, has its auth for this config.
                table = SpoolTable(config.data_dir / SPOOL_DIR, config.spool_max_disk)
                self.downloads = SpoolDownloads(table, self.credentials.auth, self.state, self.metrics,
                                                self.credentials.signals, self.blob_fetched, config.upstream_timeout)
                self.heads = HeadFlights(table)
                self.grants = GrantSigner(load_or_create_key(config.data_dir))

    def downloads_running(self) -> int:
        """Downloads not finished yet; clients and caches may be reading their spools."""
        return 0 if self.downloads is None else len(self.downloads.running)

    def done(self) -> None:
        if self.downloads is not None:
            self.downloads.close()
            self.downloads = None

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        egress: Target | None = flow.metadata.get(EGRESS)
        if self.downloads is None or flow.response is not None or egress is None or egress.kind != "blob":
            return
        if flow.request.method == "HEAD":
            await self._answer_head(flow, egress)
            return
        base = client_base_url(flow.metadata[CLIENT_HOST], self.settings.config.dataplane.port)
        if base is None:
            return  # a Host that is no host name: the fetch goes upstream itself
        if spool := await self.downloads.follow(egress.registry, egress.repository, egress.reference):
            self._send_to_spool(flow, egress, spool, base)

    async def _answer_head(self, flow: http.HTTPFlow, egress: Target) -> None:
        """A blob HEAD answered from what a spool or a concurrent HEAD knows (blob_heads.py)."""
        key = spool_key(egress)
        head, goes_for_others = await self.heads.answer(key)
        if goes_for_others:
            flow.metadata[HEAD_FLIGHT] = key
        elif head is not None:
            answer_head(flow, head)
            del flow.metadata[UPSTREAM]  # not an upstream request: no credentials, nothing counted
            flow.metadata[SPOOL_FOLLOWER] = True
            logger.info("blob HEAD for %s: %s answered from what regcache knows", egress.registry.name, describe(key))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Also for an answer made in `request` (a refusal, a 503): mitmproxy calls this hook then too.
        if (key := flow.metadata.pop(HEAD_FLIGHT, None)) is not None:
            self.heads.answered(key, flow.response.status_code, flow.response.headers)

    def error(self, flow: http.HTTPFlow) -> None:
        if (key := flow.metadata.pop(HEAD_FLIGHT, None)) is not None:
            self.heads.answered(key, None, {})

    def _send_to_spool(self, flow: http.HTTPFlow, egress: Target, spool: Spool, base: str) -> None:
        """A 307 to the data plane on the host name the cache used for this listener (the data
        plane binds every interface by default), never REGCACHE_DATAPLANE_URL: that is for clients."""
        grant = self.grants.grant("spool", egress.registry.name, egress.repository, egress.reference, spool.size)
        flow.response = http.Response.make(307, b"", {"Location": self.grants.url(base, grant)})
        # Not an upstream request: no credentials, no upstream fetch counted, no miss (the
        # download counts its own).
        del flow.metadata[UPSTREAM]
        flow.metadata[SPOOL_FOLLOWER] = True
        self.metrics.spool_follower(egress.registry.name)
        logger.info("spool follower for %s: %s sent to the data plane (%s, %d bytes)", egress.registry.name,
                    describe(spool.key), spool.state.value, spool.size)


def answer_head(flow: http.HTTPFlow, head: BlobHead) -> None:
    flow.response = http.Response.make(200, b"", head.headers())
    flow.response.headers["Content-Length"] = str(head.size)  # what a GET would send; make() set 0


def spool_key(target: Target) -> Key:
    return target.registry.name, target.repository, target.reference
