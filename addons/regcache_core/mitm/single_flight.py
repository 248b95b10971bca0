"""SingleFlight: one upstream fetch per cold blob on the egress listeners. The leader/follower
bookkeeping and the spool files are spool.py's; this addon applies them to flows."""

from __future__ import annotations

import logging

from mitmproxy import http

from ..dataplane.grants import GRANT_PATHS, GrantSigner, load_or_create_key
from ..dataplane.handoff import client_base_url
from ..metrics import Metrics
from ..routing import Target
from ..spool import SPOOL_DIR, Key, Spool, SpoolTable, describe
from .keys import CLIENT_HOST, EGRESS, EGRESS_FOR, REDIRECT, SPOOL, SPOOL_FOLLOWER, UPSTREAM
from .settings import Settings

logger = logging.getLogger(__name__)

REDIRECTS = (301, 302, 303, 307, 308)


class SingleFlight:
    """Leads or follows each egress GET of a blob: the leader goes upstream and is spooled, a
    follower is answered with a 307 to the spool on the data plane. Off with the data plane."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.table: SpoolTable | None = None
        self.grants: GrantSigner | None = None

    def configure(self, updated: set[str]) -> None:
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None:
            self.done()
            if config.dataplane is not None:
                self.table = SpoolTable(config.data_dir / SPOOL_DIR, config.spool_max_disk)
                self.grants = GrantSigner(load_or_create_key(config.data_dir))

    def done(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.table is None or flow.request.method != "GET" or flow.response is not None:
            return
        egress: Target | None = flow.metadata.get(EGRESS)
        redirect: Target | None = flow.metadata.get(REDIRECT)
        if egress is not None and egress.kind == "blob":
            role, spool = await self.table.claim(spool_key(egress))
            if role == "leader":
                flow.metadata[SPOOL] = spool
            elif role == "follower":
                self._send_to_spool(flow, egress, spool)
        elif redirect is not None and redirect.kind == "blob" and EGRESS_FOR in flow.metadata:
            # The leader's upstream redirected it (to a CDN); the bytes come on this follow-up.
            if spool := self.table.take_over(spool_key(redirect)):
                flow.metadata[SPOOL] = spool

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        spool: Spool | None = flow.metadata.get(SPOOL)
        if spool is None:
            return
        response = flow.response
        if response.status_code == 200:
            if writer := await self.table.start(spool, content_length(response)):
                response.stream = writer  # the Recorder counts the bytes after it
        elif response.status_code in REDIRECTS and "Location" in response.headers:
            del flow.metadata[SPOOL]  # its follow-up leads now
            self.table.redirected(spool)
        else:
            del flow.metadata[SPOOL]
            self.table.decline(spool)

    async def response(self, flow: http.HTTPFlow) -> None:
        if spool := flow.metadata.pop(SPOOL, None):
            await self.table.finish(spool)

    def error(self, flow: http.HTTPFlow) -> None:
        if spool := flow.metadata.pop(SPOOL, None):
            self.table.fail(spool, flow.error.msg if flow.error else "the exchange failed")

    def _send_to_spool(self, flow: http.HTTPFlow, egress: Target, spool: Spool) -> None:
        """A 307 to the data plane on the host name the cache used for this listener (the data
        plane binds every interface by default), never REGCACHE_DATAPLANE_URL: that is for clients.
        A Host that is no host name leaves the fetch to go upstream."""
        base = client_base_url(flow.metadata[CLIENT_HOST], self.settings.config.dataplane.port)
        if base is None:
            return
        grant = self.grants.grant("spool", egress.registry.name, egress.repository, egress.reference, spool.size)
        flow.response = http.Response.make(307, b"", {"Location": f"{base}{GRANT_PATHS['spool']}?{self.grants.query(grant)}"})
        # Not an upstream request: no credentials, no upstream fetch counted, no miss.
        del flow.metadata[UPSTREAM]
        flow.metadata[SPOOL_FOLLOWER] = True
        self.metrics.spool_follower(egress.registry.name)
        logger.info("spool follower for %s: %s sent to the data plane (%s, %d bytes)", egress.registry.name,
                    describe(spool.key), spool.state.value, spool.size)


def spool_key(target: Target) -> Key:
    return target.registry.name, target.repository, target.reference


def content_length(response: http.Response) -> int | None:
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isascii() and value.isdigit() else None
