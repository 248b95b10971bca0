"""One upstream fetch per cold blob for the whole cluster (the services' `blobs` with replicas).

One node's single-flight (spool/) makes every request for a cold blob follow one download into
a spool on this replica. With replicas, the request that finds no spool here asks for the blob's
lease (blob_leases.py):
- taken: this replica leads. Its download starts as one node's does, and a task holds the lease
  while the spool serves: it publishes the spool's size and type once the download has its 200,
  renews it, and releases it when the spool goes (LINGER after its end, by when the blob is in
  the shared storage, where every replica finds it warm and asks for no lease);
- held by another replica: the request waits until the leader published the size, then gets a
  PeerSpool: the caller sends it to the leader's data plane (REGCACHE_DATAPLANE_URL), with a
  grant signed with the key all replicas share (dataplane/grants.py). A lease whose leader
  declined the blob (no 200, too big to spool) or died goes, and the next look takes it; so
  does one whose leader's data plane refuses connections (a replica that died holds its
  leases for up to LEASE_TTL more, and clients sent to it would fail);
- Redis down (the link says so at once): this replica's own spools, as one node.

Blob HEADs: a HEAD of a blob another replica leads is answered from the size it published, and a
200 the upstream gave one replica's HEAD is shared for KNOWN_FOR seconds, so the cluster asks the
upstream once per blob (two replicas whose first HEADs of a blob cross may both ask: a lease per
HEAD would make every HEAD wait a round trip for a rare saving).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..config import Registry
from ..spool.blob_heads import KNOWN_FOR, BlobHead, blob_head
from ..spool.table import FOLLOW_WAIT, Key, Spool, describe
from .blob_leases import RENEW_EVERY, BlobLeases
from .lease import HeldLease
from .link import SharedStateDown

if TYPE_CHECKING:
    from ..mitm.services import Spools

logger = logging.getLogger(__name__)

LEADER_POLL = 0.05  # seconds between looks at a lease whose leader has not published the size yet
PROBE_TIMEOUT = 1.0  # seconds for a connection to a leader's data plane, before sending clients there
REACHABLE_FOR = 1.0  # seconds a connection that opened vouches for that data plane


@dataclass(frozen=True)
class PeerSpool:
    """A spool on another replica: its requests go to that replica's data plane."""

    key: Key
    size: int
    content_type: str
    dataplane: str  # the leader's base URL, http://host:port


class ClusterSpools:
    def __init__(self, local: Spools, leases: BlobLeases, follow_wait: float = FOLLOW_WAIT,
                 renew_every: float = RENEW_EVERY) -> None:
        self.local = local
        self.leases = leases
        self.follow_wait = follow_wait
        self.renew_every = renew_every
        self._reached: dict[str, float] = {}  # data plane URL -> when a connection to it last opened
        self.tasks: set[asyncio.Task] = set()  # holding leases, sharing HEADs (kept: tasks are weakly held)

    async def follow(self, registry: Registry, repository: str, digest: str) -> Spool | PeerSpool | None:
        key = (registry.name, repository, digest)
        downloads = self.local.downloads
        if downloads.table.get(key) is None and not downloads.upstream.state.reason_down(registry.name):
            try:
                if peer := await self._elsewhere(registry, key):
                    return peer
            except SharedStateDown:
                pass  # this replica's own spools, as one node
        return await self.local.follow(registry, repository, digest)

    async def _elsewhere(self, registry: Registry, key: Key) -> PeerSpool | None:
        """The leader's spool when another replica downloads the blob; None when this one does (it
        took the lease and started the download), or the leader published nothing in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.follow_wait
        table = self.local.downloads.table
        while loop.time() < deadline:
            taken = await self.leases.take(key)
            if isinstance(taken, HeldLease):
                self._lead(taken, self.local.downloads.claim(registry, key))
                return None
            if table.get(key) is not None:
                return None  # a request here took the lease while this one asked Redis: its spool
            if taken is not None and taken.size is not None and not self.leases.mine(taken):
                if await self._reachable(taken.dataplane):
                    return PeerSpool(key, taken.size, taken.content_type or "application/octet-stream", taken.dataplane)
                # Gone (its lease outlives it by up to LEASE_TTL): clients sent there would fail,
                # so the blob is taken over now.
                logger.info("cold blob %s: the data plane of the replica downloading it, %s, refuses connections; "
                            "downloading it here", describe(key), taken.dataplane)
                await self.leases.evict(key, taken)
                continue
            # The leader has no size to publish yet; or the lease is this replica's with no spool
            # here (the spool just went, its release is on its way); or it went meanwhile.
            await asyncio.sleep(LEADER_POLL)
        logger.info("cold blob %s: its leader published nothing within %.0fs; downloading it here too",
                    describe(key), self.follow_wait)
        return None

    async def _reachable(self, dataplane: str) -> bool:
        """False when a connection to that data plane is refused (or finds no host): nothing
        serves there. Looked at most once a REACHABLE_FOR per data plane. No answer in
        PROBE_TIMEOUT counts as reachable: a busy event loop (this one) must not take a live
        leader's blob over; a leader gone silent loses its lease when it expires."""
        now = asyncio.get_running_loop().time()
        if now - self._reached.get(dataplane, -REACHABLE_FOR) < REACHABLE_FOR:
            return True
        parts = urlsplit(dataplane)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                _, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            writer.close()
        except TimeoutError:
            pass
        except OSError:
            return False
        self._reached[dataplane] = now
        return True

    def _lead(self, lease: HeldLease, spool: Spool) -> None:
        task = asyncio.get_running_loop().create_task(self._hold(lease, spool))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _hold(self, lease: HeldLease, spool: Spool) -> None:
        """Publish, renew, release: the lease follows the spool's life on this replica."""
        table = self.local.downloads.table
        published = False
        while table.get(spool.key) is spool:
            try:
                if spool.servable and not published:
                    ours = published = await self.leases.publish(lease, spool.size, spool.content_type)
                else:
                    ours = await lease.renew()
            except SharedStateDown:
                ours = True  # each replica on its own meanwhile; renewed again once Redis is back
            if not ours:
                # Expired under us (Redis was away longer than the lease): whoever took it leads.
                logger.info("cold blob %s: lease lost; its spool here serves this replica only", describe(spool.key))
                return
            if spool.decided.is_set():
                await asyncio.sleep(self.renew_every)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(spool.decided.wait(), self.renew_every)
        with contextlib.suppress(SharedStateDown):
            await lease.release()  # the next request for the blob, anywhere, may take it

    async def head(self, key: Key) -> tuple[BlobHead | None, bool]:
        if self.local.downloads.table.get(key) is None:
            try:
                leader, known = await self.leases.known_head(key)
            except SharedStateDown:
                leader, known = None, None
            if leader is not None and leader.size is not None:
                return BlobHead(key[2], leader.size, leader.content_type or "application/octet-stream"), False
            if known is not None:
                return known, False
        return await self.local.head(key)

    def head_answered(self, key: Key, status: int | None, headers: Mapping[str, str]) -> None:
        self.local.head_answered(key, status, headers)
        if (head := blob_head(key[2], status, headers)) is not None:
            task = asyncio.get_running_loop().create_task(self._share_head(key, head))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _share_head(self, key: Key, head: BlobHead) -> None:
        with contextlib.suppress(SharedStateDown):
            await self.leases.share_head(key, head, KNOWN_FOR)

    async def upstream_head(self, registry: Registry, repository: str, digest: str):
        return await self.local.upstream_head(registry, repository, digest)

    def downloads_running(self) -> int:
        return self.local.downloads_running()

    async def close(self) -> None:
        """Leases held are not released: they expire (this replica may be stopping for good)."""
        for task in self.tasks:
            task.cancel()
        await self.local.close()
