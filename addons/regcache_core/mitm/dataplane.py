"""The proxy's side of the data plane (regcache_core/dataplane/): DataPlaneHandoff answers a GET
of a warm blob with a 307 to it (or, a small one, with its bytes), and notes the GETs and HEADs
of blobs the cache does not hold, for ColdBlobs (cold_blobs.py); DataPlaneRecords takes the
data plane's pull records and hands them to the same sinks as the proxy's own (pull log,
metrics), and its workers' notices that the object store did not answer to the store's health."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mitmproxy import http

from ..dataplane.grants import GrantSigner, grant_key
from ..dataplane.handoff import COLD, Cold, SmallBlob, warm_blob_answer
from ..dataplane.storage import warm_blob
from ..dataplane.records import receive_records, records_socket
from ..objectstore.answers import warm_object_answer
from ..objectstore.client import StoreRefused, StoreUnreachable
from ..observe.pull_log import PullRecord
from ..routing import Target, store_unreachable
from .answers import Answer, refusal_answer
from .flow_notes import AnsweredBy, note
from .services import Services
from .settings import Settings

logger = logging.getLogger(__name__)
# A small blob asked for with any of these goes to the cache, which answers them.
CONDITIONAL_HEADERS = ("range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range")


class DataPlaneHandoff:
    """A client's GET of a warm blob gets a 307 to the data plane, signed for that blob (or, from
    an object store with REGCACHE_S3_REDIRECT, to a presigned URL of it); a small one is answered
    from the cache's storage right here. A GET or HEAD of a blob the cache does not hold is noted
    `cold_blob` (a GET only without Range or conditions: the cache answers those). While the
    object store of a cache on one cannot be reached, that cache's requests get 503 at once."""

    def __init__(self, settings: Settings, services: Services) -> None:
        self.settings = settings
        self.services = services
        self.signer: GrantSigner | None = None

    def configure(self, updated: set[str]) -> None:
        if (config := self.settings.loaded(updated)) is not None:
            self.signer = GrantSigner(grant_key(config)) if config.dataplane else None

    async def answer(self, flow: http.HTTPFlow) -> Answer | None:
        flow_note = note(flow)
        target = flow_note.target
        request = flow.request
        if target is not None and target.registry.object_store is not None:
            return await self._from_object_store(flow, target)
        if (self.signer is None or target is None or target.kind != "blob"
                or request.method not in ("GET", "HEAD") or target.registry.storage is None):
            return None
        if request.stream or "transfer-encoding" in request.headers:
            return None  # a request with a body to stream can't be answered here (see answers.send_answer); it streams
        if request.method == "HEAD":
            if await asyncio.to_thread(warm_blob, target.registry.storage, target.repository, target.reference) is None:
                flow_note.cold_blob = True
            return None
        conditional = any(name in request.headers for name in CONDITIONAL_HEADERS)
        answer = await asyncio.to_thread(warm_blob_answer, self.settings.config, self.signer, target,
                                         flow_note.client_host, conditional)
        return self._answered(flow, target, answer, conditional)

    def store_down(self, flow: http.HTTPFlow) -> Answer | None:
        """503 for a request that would go to a cache whose object store cannot be reached: the
        cache would wait on the store for each (a manifest regcache holds is answered before)."""
        target = note(flow).target
        health = self.services.store_health
        if target is None or target.registry.object_store is None or health is None or health.reason is None:
            return None
        return refusal_answer(flow.request.method, store_unreachable(target.registry, health.where, health.reason))

    async def _from_object_store(self, flow: http.HTTPFlow, target: Target) -> Answer | None:
        blobs, health, request = self.services.stored_blobs, self.services.store_health, flow.request
        if blobs is None or target.kind != "blob" or request.method not in ("GET", "HEAD") or health.reason is not None:
            return self.store_down(flow)  # None while the store is up: the cache answers
        if request.stream or "transfer-encoding" in request.headers:
            return None  # as above
        conditional = any(name in request.headers for name in CONDITIONAL_HEADERS)
        try:
            if request.method == "HEAD":
                held = await blobs.warm(target.registry.object_store, target.repository, target.reference)
                note(flow).cold_blob = held is None and self.signer is not None
                return None
            answer = await warm_object_answer(self.settings.config, blobs, self.signer, target,
                                              note(flow).client_host, conditional)
        except StoreUnreachable as e:
            health.went_down(str(e))
            return self.store_down(flow)
        except StoreRefused:
            return None  # refused (a permission, say): the cache answers, as it can
        if isinstance(answer, str) and self.settings.config.s3.redirect:
            note(flow).cache = "hit"
            return Answer(http.Response.make(307, b"", {"Location": answer, "Docker-Content-Digest": target.reference}))
        return self._answered(flow, target, answer, conditional)

    def _answered(self, flow: http.HTTPFlow, target: Target, answer: str | SmallBlob | Cold | None,
                  conditional: bool) -> Answer | None:
        flow_note = note(flow)
        if answer is COLD:
            flow_note.cold_blob = not conditional
            return None
        if isinstance(answer, SmallBlob):
            flow_note.cache = "hit"
            return Answer(http.Response.make(200, answer.body, answer.headers))
        if answer is not None:
            return Answer(http.Response.make(307, b"", {"Location": answer, "Docker-Content-Digest": target.reference}),
                          AnsweredBy.DATA_PLANE)
        return None


class DataPlaneRecords:
    """Receives the data plane's pull records (see dataplane/records.py) and hands each to
    `deliver` (Recorder.deliver: the sinks the proxy's own records go to); a worker's notice that
    the object store did not answer takes it down as the proxy's own failures do."""

    def __init__(self, settings: Settings, deliver: Callable[[PullRecord], None], services: Services) -> None:
        self.settings = settings
        self.deliver = deliver
        self.services = services
        self.transport: asyncio.DatagramTransport | None = None

    async def running(self) -> None:
        config = self.settings.config
        if config is None or config.dataplane is None:
            return
        path = records_socket(config.data_dir)
        try:
            self.transport = await receive_records(path, self.deliver, self._store_down)
        except OSError as e:
            logger.error(f"regcache: cannot receive the data plane's pull records at {path}: {e}")

    def _store_down(self, reason: str) -> None:
        if self.services.store_health is not None:
            self.services.store_health.went_down(f"a data-plane worker: {reason}")

    def done(self) -> None:
        if self.transport is not None:
            self.transport.close()
