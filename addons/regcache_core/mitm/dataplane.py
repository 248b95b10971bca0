"""The proxy's side of the data plane (regcache_core/dataplane/): DataPlaneHandoff answers a GET
of a warm blob with a 307 to it (or, a small one, with its bytes), and notes the GETs and HEADs
of blobs the cache does not hold, for ColdBlobs (cold_blobs.py); DataPlaneRecords takes the
data plane's pull records and hands them to the same sinks as the proxy's own (pull log,
metrics)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mitmproxy import http

from ..dataplane.grants import GrantSigner, grant_key
from ..dataplane.handoff import COLD, SmallBlob, warm_blob_answer
from ..dataplane.storage import warm_blob
from ..dataplane.records import receive_records, records_socket
from ..observe.pull_log import PullRecord
from .answers import Answer
from .flow_notes import AnsweredBy, note
from .settings import Settings

logger = logging.getLogger(__name__)
# A small blob asked for with any of these goes to the cache, which answers them.
CONDITIONAL_HEADERS = ("range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range")


class DataPlaneHandoff:
    """A client's GET of a warm blob gets a 307 to the data plane, signed for that blob; a small
    one is answered from the cache's storage right here. A GET or HEAD of a blob the cache does
    not hold is noted `cold_blob` (a GET only without Range or conditions: the cache answers those)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.signer: GrantSigner | None = None

    def configure(self, updated: set[str]) -> None:
        if (config := self.settings.loaded(updated)) is not None:
            self.signer = GrantSigner(grant_key(config)) if config.dataplane else None

    async def answer(self, flow: http.HTTPFlow) -> Answer | None:
        flow_note = note(flow)
        target = flow_note.target
        request = flow.request
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
    `deliver` (Recorder.deliver: the sinks the proxy's own records go to)."""

    def __init__(self, settings: Settings, deliver: Callable[[PullRecord], None]) -> None:
        self.settings = settings
        self.deliver = deliver
        self.transport: asyncio.DatagramTransport | None = None

    async def running(self) -> None:
        config = self.settings.config
        if config is None or config.dataplane is None:
            return
        path = records_socket(config.data_dir)
        try:
            self.transport = await receive_records(path, self.deliver)
        except OSError as e:
            logger.error(f"regcache: cannot receive the data plane's pull records at {path}: {e}")

    def done(self) -> None:
        if self.transport is not None:
            self.transport.close()
