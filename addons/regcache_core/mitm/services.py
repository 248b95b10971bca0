"""Services: what regcache's addons share, with one owner.

The upstream client (and its deadline), the upstream state, what upstream answers tell
(UpstreamAnswers: metrics, state, auth, rate limits), upstream auth with its token store, the
tag cache with the manifests in memory (ManifestFront), the spools with their downloads and
blob HEADs (with replicas, cluster-wide: cluster/blob_flights.py), the pull log, and with replicas
(REGCACHE_REDIS_URL) the link to their shared Redis. Built here when the config loads (the ones of
an earlier config closed first), and closed here once when mitmproxy stops; no addon configures or closes them.
Addons look them up when a request needs them, so no addon's `configure` depends on another's.

Addons see them through narrow interfaces: UpstreamStatus (upstream/state.py), UpstreamAnswers
(upstream/signals.py), TagStore (manifests/tags.py), ReferenceFlights (manifests/flights.py),
BlobFlights (here) and the pull log as a Recorder sink. On one node their implementations live
in this process; with replicas (`config.cluster`) the upstream state, the tags, the reference
flights, the blob flights and the usage records are the shared ones of cluster/, each going on
with this replica's own while Redis is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Protocol

from ..cluster.blob_flights import ClusterSpools, PeerSpool
from ..cluster.blob_leases import BlobLeases
from ..cluster.flights import SharedFlights
from ..cluster.leases import Leases, replica_id
from ..cluster.reads import ClusterReads
from ..cluster.link import RedisLink
from ..cluster.tags import SharedTags
from ..cluster.upstream import SharedUpstreamState
from ..cluster.usage import SharedUsage
from ..config import Registry
from ..manifests.by_digest import ManifestCache
from ..manifests.front import ManifestFront
from ..manifests.tags import TagCache
from ..observe.metrics import Metrics
from ..objectstore.blobs import StoredBlobs
from ..objectstore.copies import spool_keeper
from ..objectstore.health import StoreHealth
from ..observe.pull_log import PullLog, PullRecord
from ..spool.blob_heads import BlobHead, HeadFlights
from ..spool.download import SpoolDownloads
from ..spool.table import SPOOL_DIR, Key, Spool, SpoolTable
from ..upstream.auth import MAX_TOKEN_RESPONSE, TokenStore, UpstreamAuth
from ..upstream.client import UpstreamClient
from ..upstream.signals import UpstreamAnswers
from ..upstream.state import UpstreamState, UpstreamStatus
from .settings import Settings

TOKEN_STORE = "upstream-tokens"  # folder in the data dir
TAG_STORE = "tags"  # folder in the data dir


class BlobFlights(Protocol):
    """One upstream fetch per cold blob: the spool a cache's GET follows, and blob HEADs."""

    async def follow(self, registry: Registry, repository: str, digest: str) -> Spool | PeerSpool | None: ...

    async def head(self, key: Key) -> tuple[BlobHead | None, bool]: ...

    def head_answered(self, key: Key, status: int | None, headers: Mapping[str, str]) -> None: ...

    async def upstream_head(self, registry: Registry, repository: str, digest: str) -> tuple[int | None, Mapping[str, str]]: ...

    def downloads_running(self) -> int: ...

    async def close(self) -> None: ...


class Spools:
    """BlobFlights on this proxy's spools (spool/table.py, spool/download.py, spool/blob_heads.py)."""

    def __init__(self, downloads: SpoolDownloads, heads: HeadFlights) -> None:
        self.downloads = downloads
        self.heads = heads

    async def follow(self, registry: Registry, repository: str, digest: str) -> Spool | None:
        return await self.downloads.follow(registry, repository, digest)

    async def head(self, key: Key) -> tuple[BlobHead | None, bool]:
        return await self.heads.answer(key)

    def head_answered(self, key: Key, status: int | None, headers: Mapping[str, str]) -> None:
        self.heads.answered(key, status, headers)

    async def upstream_head(self, registry: Registry, repository: str, digest: str) -> tuple[int | None, Mapping[str, str]]:
        """The upstream's own answer to a HEAD of the blob, asked as a download asks (never a download)."""
        return await self.downloads.head(registry, repository, digest)

    def downloads_running(self) -> int:
        """Downloads not finished yet: clients and caches may be reading their spools."""
        return len(self.downloads.running)

    async def close(self) -> None:
        await self.downloads.close()


class Services:
    def __init__(self, settings: Settings, metrics: Metrics, blob_fetched: Callable[[str, str, str], None]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.blob_fetched = blob_fetched  # (registry, repository, digest): HitMarker's InFlight.upstream_blob_fetch
        # For the process's life:
        self.upstream_client = UpstreamClient()  # token fetches, challenges, tag HEADs, probes
        self.own_upstream_state = UpstreamState(metrics, self.upstream_client.ping)
        self.upstream_state: UpstreamStatus = self.own_upstream_state  # with replicas, the shared one
        self.replica = replica_id()  # who holds a lease, who sent a message
        # For one config:
        self.upstream: UpstreamAnswers | None = None
        self.manifests: ManifestFront | None = None
        self.blobs: BlobFlights | None = None  # with the data plane only
        self.pull_log: PullLog | None = None
        self.shared_state: RedisLink | None = None  # with replicas only:
        self.leases: Leases | None = None
        self.shared_usage: SharedUsage | None = None
        self.reads: ClusterReads | None = None  # the blobs the proxy sends, for every replica's budget
        self.stored_blobs: StoredBlobs | None = None  # with caches on an object store only
        self.store_health: StoreHealth | None = None  # the same
        self._closing: set[asyncio.Task] = set()  # closes of an earlier config's links, kept: tasks are weakly held

    def configure(self, updated: set[str]) -> None:
        if (config := self.settings.loaded(updated)) is None:
            return
        self._close_config()
        self.metrics.registries_known([r.name for r in config.registries])
        tags = TagCache(config.data_dir / TAG_STORE, config.tag_ttl)
        flights = None
        if config.cluster is not None:
            link = self.shared_state = RedisLink(config.cluster.redis_url, config.cluster.redis_timeout,
                                                 self.metrics.shared_state_up)
            self.metrics.shared_state_up(True)
            self.leases = Leases(link, self.replica)
            self.shared_usage = SharedUsage(link)
            self.reads = ClusterReads(link)
            self.upstream_state = SharedUpstreamState(link, self.own_upstream_state, self.replica)
            tags = SharedTags(link, tags)
            flights = SharedFlights(self.leases, tags.flush)
        self.upstream_client.timeout = config.upstream_timeout
        auth = UpstreamAuth(TokenStore(config.data_dir / TOKEN_STORE), self._fetch_token, on_token_fetch=self.metrics.token_fetch,
                            challenge_timeout=config.upstream_timeout)
        self.upstream = UpstreamAnswers(auth, self.upstream_state, self.metrics)
        self.manifests = ManifestFront(tags, ManifestCache(config.manifest_cache_bytes), self.upstream_client,
                                       self.upstream, flights)
        if config.dataplane is not None:
            table = SpoolTable(config.data_dir / SPOOL_DIR, config.spool_max_disk, keep=spool_keeper(config))
            self.blobs = Spools(SpoolDownloads(table, self.upstream, self.blob_fetched, config.upstream_timeout),
                                HeadFlights(table))
            if self.shared_state is not None:
                self.blobs = ClusterSpools(self.blobs, BlobLeases(self.shared_state, config.dataplane.url))
        self.pull_log = PullLog(config.pull_log, config.pull_log_stdout)
        if stores := [r.object_store for r in config.registries if r.object_store is not None]:
            blobs = self.stored_blobs = StoredBlobs(config.s3, config.upstream_timeout)
            self.store_health = StoreHealth(config.s3.describe(), lambda: blobs.probe(stores[0]),
                                            self.metrics.object_store_up)
            self.metrics.object_store_up(True)

    async def done(self) -> None:
        self._close_config()
        await asyncio.gather(*self._closing)
        self.own_upstream_state.close()
        await self.upstream_client.close()

    def downloads_running(self) -> int:
        """For the drain: cold downloads whose readers are on the data plane."""
        return 0 if self.blobs is None else self.blobs.downloads_running()

    def log_pull(self, record: PullRecord) -> None:
        """A Recorder sink: the pull log."""
        if self.pull_log is not None:
            self.pull_log.write(record)

    def _close_later(self, closing_call) -> None:
        closing = asyncio.get_running_loop().create_task(closing_call)
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _fetch_token(self, url: str, headers: dict[str, str], timeout: float) -> tuple[int, list[str], bytes]:
        return await self.upstream_client.get(url, headers, timeout, MAX_TOKEN_RESPONSE)

    def shared_state_detail(self) -> str | None:
        """For /ready: "ok" or why replicas go on alone; None on one node."""
        return None if self.shared_state is None else self.shared_state.state()

    def object_store_detail(self) -> str | None:
        """For /ready: "up" or why the object store is down; None without caches on one."""
        return None if self.store_health is None else self.store_health.state()

    def _close_config(self) -> None:
        """Close what the last config built."""
        if self.shared_state is not None:
            self.upstream_state.close()
            self.upstream_state = self.own_upstream_state
            self.reads.close()
            self._close_later(self.shared_state.close())
            self.shared_state = self.leases = self.shared_usage = self.reads = None
        if self.stored_blobs is not None:
            self.store_health.close()
            self._close_later(self.stored_blobs.close())
            self.stored_blobs = self.store_health = None
        if self.blobs is not None:
            self._close_later(self.blobs.close())  # done waits for the download worker's exit
            self.blobs = None
        if self.manifests is not None:
            self.manifests.close()
            self.manifests.tags.close()
            self.manifests = None
        if self.upstream is not None:
            self.upstream.auth.store.close()
            self.upstream = None
        if self.pull_log is not None:
            self.pull_log.close()
            self.pull_log = None
