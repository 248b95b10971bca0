"""A spooled download's body, from the upstream's connection into its spool file (worker.py),
received into reused buffers past aiohttp's StreamReader (http_body.py: how, and why).

The file gets each buffer as soon as it is full (readers follow the file), or once FLUSH_EVERY
has passed since its first byte: from a slow link a buffer fills slowly, and readers cut a
spool that does not grow. Several buffers are in flight at once: each is written to the file
and hashed (hashed_file.py: on threads of their own, the hash beside the write) while the next
one fills; both must be done before a buffer is reused, and before the digest is told. Every
byte is hashed: the proxy seals the spool only when they hash to the blob's digest, and readers
never get the last bytes of a spool not sealed. A body that brings no byte for BODY_STALL
seconds fails (TimeoutError), as does one that ends short of its Content-Length (BodyFailed).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import aiohttp

from ..hashed_file import HashedFile
from ..http_body import BufferedBody

BODY_STALL = 30.0  # seconds without a byte of the body, then the download fails (readers wait longer)
FLUSH_EVERY = 0.2  # seconds a slow body's bytes wait for the rest of their buffer, at most (readers wait for them)


class BodyFailed(Exception):
    """The body did not come whole: the upstream ended it early or closed the connection."""


async def receive_body(response: aiohttp.ClientResponse, path: str, size: int, algorithm: str) -> tuple[int, str]:
    """The `size` bytes of the body of `response` (its headers read) into the file at `path`
    (which must exist: one the proxy removed is a failed spool): the bytes written and their
    digest. The response is closed on the way out: its connection carried a protocol of ours."""
    fd = os.open(path, os.O_WRONLY)  # no O_CREAT
    file = HashedFile(fd, algorithm, "regcache-spool")
    body = SpoolBody(size, file.submit)
    try:
        start = body.take_over(response)
        if start:  # written first
            body._start(memoryview(start), reused=False)
        body._check_finished()
        await body.finished
    finally:
        body.stop()
        response.close()  # never back to the pool: aiohttp's parser did not see the body
        await file.close(lambda: os.close(fd))
    return body.received, file.digest()


class SpoolBody(BufferedBody):
    """Receives `size` bytes into its buffers; `store(piece)` starts each buffer's write and
    hash (HashedFile.submit). `finished` is done once every byte is written and hashed, or fails
    with the reason the body did not come whole."""

    def __init__(self, size: int, store: Callable[[memoryview], asyncio.Future[None]]) -> None:
        super().__init__(size, BODY_STALL, BodyFailed, TimeoutError, "the upstream", "body")
        self.store = store
        self.pending = 0  # writes and hashes under way
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.flush_timer: asyncio.TimerHandle | None = None

    def stop(self) -> None:
        if self.flush_timer is not None:
            self.flush_timer.cancel()
        if not self.finished.done():
            self.finished.cancel()
        super().stop()

    def _filled(self, piece: memoryview) -> None:
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        self._start(piece, reused=True)

    def _arrived(self, first: bool) -> None:
        if first:
            self.flush_timer = self.loop.call_later(FLUSH_EVERY, self._flush)

    def _flush(self) -> None:
        """The filling buffer's bytes to the file now."""
        self.flush_timer = None
        if self.used:
            self._filled(self._cut())

    def _failed(self) -> None:
        if not self.finished.done():
            self.finished.set_exception(self.failure)

    def _start(self, piece: memoryview, reused: bool) -> None:
        """Write and hash `piece`; then, if `reused`, its buffer is free again."""
        self.pending += 1
        job = self.store(piece)
        job.add_done_callback(lambda job: self._written(job, piece if reused else None))

    def _written(self, job: asyncio.Future, piece: memoryview | None) -> None:
        self.pending -= 1
        if job.cancelled() or job.exception() is not None:  # the disk failed, or the spool went
            self._fail(BodyFailed("the write was cancelled") if job.cancelled() else job.exception())
            return
        if piece is not None and not self.finished.done():
            self._give_back(piece)
        self._check_finished()

    def _check_finished(self) -> None:
        if self.received == self.size and not self.pending and not self.finished.done():
            self.finished.set_result(None)
