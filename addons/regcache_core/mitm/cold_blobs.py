"""ColdBlobs: a client's GET or HEAD of a blob its cache does not hold (DataPlaneHandoff marked
it COLD_BLOB), answered without the cache, and with no byte of the blob through the proxy.

- GET: the client follows the proxy's download of the blob (SingleFlight's SpoolDownloads, one
  per blob whatever asks: clients and the cache's own fetches): a 307 to the data plane's
  `/_regcache/cold` for the blob's spool, which it sends by sendfile as the download writes it.
  The cache is asked once per download to store the blob (spool/cache_fill.py); its fetches get the
  same spool. The download makes the earliest client request for the blob a miss
  (observe/hits.py), and the grant carries that mark to the data plane's pull record. With no
  spool to follow (the upstream is down, the download got no 200 body, the blob would go past
  REGCACHE_SPOOL_MAX_DISK) the GET goes to the cache as it came.
- HEAD: answered from what spool/blob_heads.py knows (a spool's 200, a concurrent HEAD's, one of the
  last 30 s), else from one upstream HEAD made here with regcache's credentials and redirects
  followed as a download's (spool/download.py), which the HEADs that come meanwhile share:
  never a download (registry:2 2.8 fetches and stores a whole blob to answer a HEAD of it). An
  upstream 404 is answered 404; any other answer, or none, sends the HEAD to the cache as it
  came. Neither hit nor miss in the pull log: the cache was not asked, and nothing fetched.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import http

from ..dataplane.handoff import client_url_base
from ..observe.hits import InFlight
from ..observe.metrics import Metrics
from ..routing import Refusal, Target
from ..spool.blob_heads import blob_head
from ..spool.cache_fill import ask_cache_to_store
from ..spool.table import Spool, describe
from ..upstream.state import UpstreamState
from .keys import ANSWERED_HERE, CLIENT_HOST, COLD_BLOB, HANDED_OFF, TARGET
from .router import refuse
from .settings import Settings
from .single_flight import SingleFlight, answer_head, spool_key

logger = logging.getLogger(__name__)


class ColdBlobs:
    """Runs after HitMarker, which must watch a GET before its download can mark it a miss."""

    def __init__(self, settings: Settings, single_flight: SingleFlight, state: UpstreamState, metrics: Metrics,
                 in_flight: InFlight) -> None:
        self.settings = settings
        self.single_flight = single_flight  # its downloads (and their blob HEADs), HEADs in flight and grant signer
        self.state = state
        self.metrics = metrics
        self.in_flight = in_flight
        self.stores: set[asyncio.Task] = set()  # the caches asked to store a blob (kept: tasks are weakly held)

    def done(self) -> None:
        for task in self.stores:
            task.cancel()

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or COLD_BLOB not in flow.metadata or self.single_flight.downloads is None:
            return
        target: Target = flow.metadata[TARGET]
        if flow.request.method == "HEAD":
            await self._answer_head(flow, target)
        else:
            await self._follow_download(flow, target)

    async def _follow_download(self, flow: http.HTTPFlow, target: Target) -> None:
        base = client_url_base(self.settings.config.dataplane, flow.metadata[CLIENT_HOST])
        if base is None:
            return  # a Host that is no host name: the cache answers
        spool = await self.single_flight.downloads.follow(target.registry, target.repository, target.reference)
        if spool is None:
            return
        grants = self.single_flight.grants
        grant = grants.grant("cold", target.registry.name, target.repository, target.reference, spool.size,
                             "miss" if self.in_flight.missed(flow.id) else "hit")
        flow.metadata[HANDED_OFF] = True
        flow.response = http.Response.make(307, b"", {"Location": grants.url(base, grant),
                                                      "Docker-Content-Digest": target.reference})
        self.metrics.spool_follower(target.registry.name)
        if not spool.cache_asked:
            spool.cache_asked = True
            self._ask_cache_to_store(target, spool)

    def _ask_cache_to_store(self, target: Target, spool: Spool) -> None:
        task = asyncio.get_running_loop().create_task(ask_cache_to_store(
            target.backend, target.registry.storage, target.repository, target.reference, spool.size))
        self.stores.add(task)
        task.add_done_callback(self.stores.discard)
        logger.info("cold blob %s: clients follow its download; its cache is asked to store it", describe(spool.key))

    async def _answer_head(self, flow: http.HTTPFlow, target: Target) -> None:
        if self.state.reason_down(target.registry.name):
            return  # the cache answers, from what it holds (UpstreamDeadlines answers its fetch)
        key = spool_key(target)
        heads = self.single_flight.heads
        head, goes_for_others = await heads.answer(key)
        if goes_for_others:
            status, headers = None, {}
            try:
                status, headers = await self.single_flight.downloads.head(target.registry, target.repository,
                                                                          target.reference)
            finally:
                heads.answered(key, status, headers)
            head = blob_head(target.reference, status, headers)
            if head is None and status == 404:
                self.in_flight.forget(flow.id)
                refuse(flow, Refusal(404, "BLOB_UNKNOWN", f"{target.registry.upstream} does not have {target.reference} "
                                                          f"in {target.repository}"))
                return
        if head is not None:
            self.in_flight.forget(flow.id)
            answer_head(flow, head)
            flow.metadata[ANSWERED_HERE] = True
