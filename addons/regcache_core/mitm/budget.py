"""DiskBudget: records each client pull of cached content (a Recorder sink) and runs the disk
budget, the caches' free-space checks and, for caches on an object store, the removal of old
partial uploads (regcache_core/budget/) in a thread of its own, never on mitmproxy's event loop.

With replicas, pulls are recorded in Redis too (cluster/usage.py; the ones Redis missed while
down are sent when it is back), eviction ranks by the cluster's records, a run takes the
eviction lease first (one replica at a time evicts from the storage they share), and it skips
blobs any replica is sending or handed out by a URL still valid (cluster/reads.py: this proxy
registers its own sends and URLs there). While Redis is down a replica runs alone on its own
records and its own sends, as one node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from mitmproxy import http

from ..budget import report
from ..budget.disk import DiskWatch
from ..budget.enforce import CacheBudget, enforce, summary
from ..budget.uploads import MAX_AGE, SWEEP_EVERY, sweep
from ..budget.usage import UsageStore, usage_file
from ..cluster.link import SharedStateDown
from ..cluster.reads import Blob, ClusterReads
from ..cluster.usage import EVICTION, SharedUsage
from ..deadlines import Deadlines
from ..objectstore.blobs import PRESIGNED_FOR
from ..objectstore.client import StoreRefused, StoreUnreachable
from ..objectstore.tree import ObjectTree
from ..stack.caches import local_backends
from ..observe.metrics import Metrics
from ..observe.pull_log import PullRecord
from .flow_notes import note
from .services import Services
from .settings import Settings

logger = logging.getLogger(__name__)
RUN_DELAY = 2.0  # seconds after a blob pull: registry:2 commits a fetched blob just after serving it
RUN_EVERY = 30.0  # seconds between runs without pulls: the free-space warning needs no request
TICK = 0.5  # seconds between looks at whether a run is due
# A warm blob of an object store handed to a client by a URL (the data plane's, a presigned one)
# is read after the proxy's answer: it stays for as long as such a URL is valid.
HANDED_OUT_FOR = PRESIGNED_FOR
LOOP_WAIT = 10.0  # seconds the worker waits for a Redis call on the event loop (which has its own, shorter, deadline)


class DiskBudget:
    def __init__(self, settings: Settings, metrics: Metrics, services: Services) -> None:
        self.settings = settings
        self.metrics = metrics
        self.services = services  # with replicas: the shared usage records and the eviction lease
        # One thread: the usage store's SQLite connection belongs to it, and runs never overlap.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="regcache-budget")
        self.usage: UsageStore | None = None
        self.caches: list[CacheBudget] = []
        self.disk_watch = DiskWatch(0)
        self._sending: dict[str, tuple[str, str]] = {}  # flow id -> (registry, blob digest) in flight
        self._sending_lock = threading.Lock()  # the worker reads it while the event loop changes it
        self._registered: dict[str, tuple[ClusterReads, Blob]] = {}  # flow id -> its send, told to the cluster
        self._store_unreachable = False  # the last run found the object store down (warned once)
        # (registry, digest) -> monotonic time its URLs expire (every URL is valid HANDED_OUT_FOR);
        # each tick drops the expired ones.
        self._handed_out = Deadlines()
        # Uses not yet in the store, written together each tick: (registry, repository, reference) -> (kind, time).
        self._uses: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._uses_lock = threading.Lock()  # records come from the event loop and the data plane's thread
        self._queued_run: Future | None = None
        self._blob_pulled: float | None = None  # monotonic time of a blob pull no run has followed yet
        self._timer: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # where Redis calls run, for the worker
        self._unshared: dict[tuple[str, str, str], tuple[str, float]] = {}  # uses Redis has not had (the worker's)

    def configure(self, updated: set[str]) -> None:
        if (config := self.settings.loaded(updated)) is None:
            return
        for old in self.caches:
            if isinstance(old.storage, ObjectTree):
                self.worker.submit(old.storage.close)  # its event loop is the worker's
        self.caches = [CacheBudget(b.registry.name, b.storage or ObjectTree(config.s3, b.registry.object_store,
                                                                           config.upstream_timeout),
                                   b.registry.max_disk) for b in local_backends(config)]
        self.disk_watch = DiskWatch(config.min_free_disk)
        if config.max_disk is not None:
            self.metrics.total_disk_budget.set(config.max_disk)
        if self.usage is None:  # the first configuration's data dir holds it for the process's life
            self.worker.submit(self._open_usage, config)

    async def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timer = asyncio.create_task(self._every())

    def done(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self._queued_run is not None:
            self._queued_run.cancel()  # a run not started yet would only delay the exit
        self._loop = None  # stopping: the last tick's uses go to this replica's store only
        self.worker.submit(self._write_uses)  # the last tick's
        self.worker.shutdown(wait=False)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        target = note(flow).target
        if target and target.registry.cache and target.kind == "blob":
            with self._sending_lock:
                self._sending[flow.id] = (target.registry.name, target.reference)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """With replicas, a blob this proxy sends is registered for every replica's budget."""
        if flow.response.status_code == 200 and (reads := self.services.reads) is not None:
            with self._sending_lock:
                blob = self._sending.get(flow.id)
            if blob is not None:
                reads.started(*blob)
                self._registered[flow.id] = (reads, blob)

    def response(self, flow: http.HTTPFlow) -> None:
        flow_note = note(flow)
        target = flow_note.target
        if (target and target.kind == "blob" and target.registry.object_store is not None
                and flow.response.status_code == 307 and not flow_note.cold_blob):  # a cold one is read from its spool
            blob = (target.registry.name, target.reference)
            with self._sending_lock:
                self._handed_out.set(blob, time.monotonic() + HANDED_OUT_FOR)
            if (reads := self.services.reads) is not None:  # the replica evicting may be another
                reads.handed_out(*blob, HANDED_OUT_FOR)  # a Redis call only when no registration covers it
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def record(self, record: PullRecord) -> None:
        """Recorder sink: a client's successful GET of a cached manifest or blob is a use of it."""
        registry = self.settings.config.registry(record.registry) if record.registry and self.settings.config else None
        # A warm blob of an object store may be pulled by a presigned URL: its 307 is the use.
        pulled = (200, 307) if registry and registry.object_store else (200,)
        if (registry is None or not registry.cache or record.kind not in ("blob", "manifest")
                or record.method != "GET" or record.status not in pulled):
            return
        with self._uses_lock:
            self._uses[record.registry, record.repository, record.reference] = (record.kind, time.time())
        if record.kind == "blob":  # any thread may call this (the data plane's records)
            self._blob_pulled = time.monotonic()

    def disk_states(self) -> dict[str, str]:
        """Registry name -> "ok" or what is wrong with its cache's disk. Blocking: call in a thread."""
        return {c.registry: self.disk_watch.check(c.registry, c.storage) for c in self.caches
                if not isinstance(c.storage, ObjectTree)}  # an object store's room is not this machine's

    def _finish(self, flow: http.HTTPFlow) -> None:
        with self._sending_lock:
            self._sending.pop(flow.id, None)
        if (registered := self._registered.pop(flow.id, None)) is not None:
            reads, blob = registered
            reads.ended(blob)

    def _is_sending(self, registry: str, digest: str) -> bool:
        with self._sending_lock:
            return ((registry, digest) in self._sending.values()
                    or self._handed_out.until((registry, digest)) > time.monotonic())

    def _busy(self, registry: str, digest: str) -> bool:
        """Whether a pull reads the blob now: on this replica, or with replicas on any (a send
        registered in Redis); while Redis is down, on this replica only."""
        if self._is_sending(registry, digest):
            return True
        if (reads := self.services.reads) is None:
            return False
        try:
            return self._on_loop(reads.read_anywhere(registry, digest))
        except SharedStateDown:
            return False

    async def _every(self) -> None:
        last = time.monotonic()
        swept = None  # the first tick sweeps
        while True:
            await asyncio.sleep(TICK)
            self._forget_expired_urls()
            if self._uses:
                self.worker.submit(self._write_uses)
            now, pulled = time.monotonic(), self._blob_pulled
            if swept is None or now - swept >= SWEEP_EVERY:
                swept = now
                self.worker.submit(self._sweep_uploads)
            if (pulled is not None and now - pulled >= RUN_DELAY) or now - last >= RUN_EVERY:
                self._blob_pulled, last = None, now
                if self._queued_run is None:  # a slow run is not queued again behind itself
                    self._queued_run = self.worker.submit(self._run)

    def _forget_expired_urls(self) -> None:
        now = time.monotonic()
        with self._sending_lock:
            self._handed_out.drop_expired(now)

    # In the worker thread:

    def _open_usage(self, config) -> None:
        try:
            self.usage = UsageStore(usage_file(config.data_dir))
        except (OSError, sqlite3.Error) as e:
            logger.error(f"regcache: cannot open {usage_file(config.data_dir)}: {e}; the disk budget cannot run")

    def _write_uses(self) -> None:
        with self._uses_lock:
            uses, self._uses = self._uses, {}
        try:
            if self.usage and uses:
                self.usage.record((*key, kind, used) for key, (kind, used) in uses.items())
        except sqlite3.Error as e:
            logger.error(f"regcache: cannot record a pull in {usage_file(self.settings.config.data_dir)}: {e}")
        self._share_uses(uses)

    def _share_uses(self, uses: dict[tuple[str, str, str], tuple[str, float]]) -> None:
        if (shared := self.services.shared_usage) is None:
            self._unshared = {}
            return
        for key, (kind, used) in uses.items():
            if key not in self._unshared or self._unshared[key][1] < used:
                self._unshared[key] = (kind, used)
        if not self._unshared:
            return
        try:
            self._on_loop(shared.record([(*key, kind, used) for key, (kind, used) in self._unshared.items()]))
        except SharedStateDown:
            return  # kept for the next tick
        self._unshared = {}

    def _on_loop(self, call):
        """Run a Redis call (a coroutine) on the event loop and wait for it, from the worker.
        Raises SharedStateDown, also when the loop cannot run it (it is stopping)."""
        if (loop := self._loop) is None:
            call.close()
            raise SharedStateDown("stopping")
        try:
            return asyncio.run_coroutine_threadsafe(call, loop).result(LOOP_WAIT)
        except (TimeoutError, RuntimeError):  # RuntimeError: the loop is closed
            raise SharedStateDown("no answer in time") from None

    def _run(self) -> None:
        self._queued_run = None
        self._write_uses()  # eviction ranks by them
        try:
            self.disk_states()
            config = self.settings.config
            if self.usage is None or (config.max_disk is None and all(c.budget is None for c in self.caches)):
                return
            lease = None
            records = self.usage
            if (leases := self.services.leases) is not None:
                try:
                    if (lease := self._on_loop(leases.take(EVICTION))) is None:
                        return  # another replica is running the budget over the storage they share
                    records = ClusterRecords(self._on_loop, self.services.shared_usage, self.usage)
                except SharedStateDown:
                    pass  # this replica alone, on its own records
            try:
                results = enforce(self.caches, config.max_disk, records, self._busy)
            finally:
                if lease is not None:
                    with contextlib.suppress(SharedStateDown):  # it lapses by itself
                        self._on_loop(lease.end())
            for r in results:
                self.metrics.budget_run(r.registry, r.used, r.budget, r.evicted.blobs, r.evicted.bytes, r.skipped)
            if line := summary(results, config.max_disk):
                report(line)
            self._store_unreachable = False
        except StoreUnreachable as e:
            if not self._store_unreachable:  # once until a run gets through: /ready and the proxy say the rest
                logger.warning(f"regcache: disk budget: the object store cannot be reached ({e}); trying again later")
            self._store_unreachable = True
        except Exception:
            logger.exception("regcache: disk budget run failed")

    def _sweep_uploads(self) -> None:
        """Partial uploads left in the caches on an object store (budget/uploads.py)."""
        for cache in self.caches:
            if not isinstance(tree := cache.storage, ObjectTree):
                continue  # on a filesystem registry:2's own purger removes them
            try:
                if removed := sweep(tree, time.time()):
                    uploads = "partial upload" if len(removed) == 1 else "partial uploads"
                    report(f"regcache: {cache.registry}: removed {len(removed)} {uploads} older than {MAX_AGE / 3600:g} h "
                           f"from {tree}")
            except (StoreUnreachable, StoreRefused) as e:
                logger.warning(f"regcache: {cache.registry}: cannot remove old partial uploads from {tree} ({e}); "
                               f"trying again in {SWEEP_EVERY / 3600:g} h")
            except Exception:
                logger.exception(f"regcache: {cache.registry}: removing old partial uploads failed")


class ClusterRecords:
    """The usage records a run ranks by, with replicas: the cluster's, or this replica's own if
    Redis goes away mid-run."""

    def __init__(self, on_loop: Callable, shared: SharedUsage, own: UsageStore) -> None:
        self.on_loop = on_loop  # DiskBudget._on_loop
        self.shared = shared
        self.own = own

    def blob_last_use(self, registry: str) -> dict[str, float]:
        try:
            return self.on_loop(self.shared.blob_last_use(registry))
        except SharedStateDown:
            return self.own.blob_last_use(registry)
