"""ColdBlobs: a client's GET or HEAD of a blob its cache does not hold (DataPlaneHandoff noted it
`cold_blob`), answered without the cache, and with no byte of the blob through the proxy.

- GET: the client follows the proxy's download of the blob (the services' `blobs`, one download
  per blob whatever asks: clients and the cache's own fetches): a 307 to the data plane's
  `/_regcache/cold` for the blob's spool, which it sends by sendfile as the download writes it.
  The cache is asked once per download to store the blob (spool/cache_fill.py), once the
  download is complete and checked and its clients have it (spool/table.py's clients_done, a
  few seconds at most): while they read, the cores go to their transfers, and the cache then
  reads the whole spool from the page cache; its fetches get the same spool. The first client
  request to follow a download is the miss, the others hits, and the grant carries that mark to
  the data plane's pull record. With no spool to follow (the download got no 200 body, the blob
  would go past REGCACHE_SPOOL_MAX_DISK) the GET goes to the cache as it came.
- HEAD: answered from what spool/blob_heads.py knows (a spool's 200, a concurrent HEAD's, one of
  the last 30 s), else from one upstream HEAD made here with regcache's credentials and redirects
  followed as a download's (spool/download.py), which the HEADs that come meanwhile share: never
  a download (registry:2 2.8 fetches and stores a whole blob to answer a HEAD of it). An upstream
  404 is answered 404; any other answer sends the HEAD to the cache as it came. Neither
  hit nor miss in the pull log: the cache was not asked, and nothing fetched.
- While the upstream is down (or found down by the download or the HEAD), both get regcache's
  `503 UNAVAILABLE` naming the registry and why, as a manifest the cache lacks does: the cache
  could only answer registry:2's 500 (its fetch fails), at times with the blob's length on it.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import http

from ..cluster.blob_flights import PeerSpool
from ..dataplane.grants import GrantSigner, grant_key
from ..dataplane.handoff import client_url_base
from ..dataplane.storage import warm_blob
from ..objectstore.client import StoreRefused, StoreUnreachable
from ..observe.metrics import Metrics
from ..routing import Refusal, Target, upstream_unreachable
from ..spool.blob_heads import blob_head
from ..spool.cache_fill import ask_cache_to_store
from ..spool.table import Spool, State, clients_done, describe
from .answers import Answer, refusal_answer
from .flow_notes import AnsweredBy, note
from .services import Services
from .settings import Settings
from .single_flight import head_answer, spool_key

logger = logging.getLogger(__name__)


class ColdBlobs:
    def __init__(self, settings: Settings, services: Services, metrics: Metrics) -> None:
        self.settings = settings
        self.services = services
        self.metrics = metrics
        self.grants: GrantSigner | None = None
        self.stores: set[asyncio.Task] = set()  # the caches asked to store a blob (kept: tasks are weakly held)

    def configure(self, updated: set[str]) -> None:
        if (config := self.settings.loaded(updated)) is not None and config.dataplane is not None:
            self.grants = GrantSigner(grant_key(config))

    def done(self) -> None:
        for task in self.stores:
            task.cancel()

    async def answer(self, flow: http.HTTPFlow) -> Answer | None:
        flow_note = note(flow)
        target = flow_note.target
        if not flow_note.cold_blob or target is None or self.services.blobs is None:
            return None
        if flow.request.method == "HEAD":
            return await self._answer_head(flow, target)
        return await self._follow_download(flow, target)

    async def _follow_download(self, flow: http.HTTPFlow, target: Target) -> Answer | None:
        flow_note = note(flow)
        base = client_url_base(self.settings.config.dataplane, flow_note.client_host)
        if base is None:
            return None  # a Host that is no host name: the cache answers
        spool = await self.services.blobs.follow(target.registry, target.repository, target.reference)
        if spool is None:
            return self._unreachable(flow, target)
        if isinstance(spool, PeerSpool):
            # Another replica downloads it, and its cache stores it in the storage replicas share;
            # that replica's first follower is the miss.
            base, first = spool.dataplane, False
        else:
            # The first client to follow the download is the one the blob came from upstream for.
            first = not spool.cache_asked
        flow_note.cache = "miss" if first else "hit"
        grant = self.grants.grant("cold", target.registry.name, target.repository, target.reference, spool.size,
                                  flow_note.cache)
        self.metrics.spool_follower(target.registry.name)
        if first:
            spool.cache_asked = True
            self._ask_cache_to_store(target, spool)
        return Answer(http.Response.make(307, b"", {"Location": self.grants.url(base, grant),
                                                    "Docker-Content-Digest": target.reference}), AnsweredBy.DATA_PLANE)

    def _ask_cache_to_store(self, target: Target, spool: Spool) -> None:
        task = asyncio.get_running_loop().create_task(self._store_once_downloaded(target, spool))
        self.stores.add(task)
        task.add_done_callback(self.stores.discard)
        logger.info("cold blob %s: clients follow its download; its cache is asked to store it once it is complete",
                    describe(spool.key))

    async def _store_once_downloaded(self, target: Target, spool: Spool) -> None:
        if spool.task is not None:
            await asyncio.wait([spool.task])  # the download is nobody's: waiting never cancels it
        if spool.state is State.COMPLETE:
            await clients_done(spool)  # the clients' transfers first
            await ask_cache_to_store(target.backend, lambda: self._stored(target), target.repository, target.reference,
                                     spool.size)

    async def _stored(self, target: Target) -> bool:
        """Whether the cache's storage (a filesystem or an object store) holds the blob now."""
        registry = target.registry
        if registry.object_store is None:
            return await asyncio.to_thread(warm_blob, registry.storage, target.repository, target.reference) is not None
        try:
            return await self.services.stored_blobs.warm(registry.object_store, target.repository,
                                                         target.reference) is not None
        except (StoreUnreachable, StoreRefused):
            return False

    async def _answer_head(self, flow: http.HTTPFlow, target: Target) -> Answer | None:
        if answer := self._unreachable(flow, target):
            return answer
        blobs = self.services.blobs
        key = spool_key(target)
        head, goes_for_others = await blobs.head(key)
        if goes_for_others:
            status, headers = None, {}
            try:
                status, headers = await blobs.upstream_head(target.registry, target.repository, target.reference)
            finally:
                blobs.head_answered(key, status, headers)
            head = blob_head(target.reference, status, headers)
            if head is None and status == 404:
                refusal = Refusal(404, "BLOB_UNKNOWN", f"{target.registry.upstream} does not have {target.reference} "
                                                       f"in {target.repository}")
                return Answer(refusal_answer(flow.request.method, refusal).response, AnsweredBy.SPOOL)
        return self._unreachable(flow, target) if head is None else head_answer(head)

    def _unreachable(self, flow: http.HTTPFlow, target: Target) -> Answer | None:
        """regcache's 503 while the blob's upstream is down (the cache does not hold the blob); None
        while it is up: the cache answers."""
        if reason := self.services.upstream_state.reason_down(target.registry.name):
            return refusal_answer(flow.request.method, upstream_unreachable(target.registry, reason, target.reference))
        return None
