"""A spooled download's body, from the upstream's connection into its spool file (worker.py).

Once aiohttp has read the final answer's headers (redirects, credentials and deadlines are its
and redirects.py's), the body skips aiohttp's StreamReader: `SpoolBody`, an
asyncio.BufferedProtocol, is put on the answer's connection and the loop receives the bytes
straight into a few preallocated buffers of READ_BUFFER bytes (from the socket, or from asyncio's
TLS layer, which decrypts into them), and each buffer is written to the spool file and hashed in
threads while the next one fills. The StreamReader made a bytes object per read, copied again
to make a MiB, and paused and resumed the transport at its 128 KiB high-water mark: reading,
writing and hashing 512 MiB from nginx on loopback took 1.4-1.9 CPU s that way, 1.05-1.2 here
(the loop's reads average about 750 KiB: a few hundred callbacks per 512 MiB).

The file gets each buffer as soon as it is full (readers follow the file), or once FLUSH_EVERY
has passed since its first byte: from a slow link a buffer fills slowly, and readers cut a
spool that does not grow. The hash runs beside the write, on its own thread, so that the bytes
reach the file (and the readers) without waiting for it; both must be done before a buffer is
reused, and before the digest is told. Every byte is hashed: the proxy seals the spool only when
they hash to the blob's digest, and readers never get the last bytes of a spool not sealed.

Bounded as the StreamReader read was: a body that brings no byte for BODY_STALL seconds fails,
as does one that ends short of its Content-Length. Exactly the Content-Length is read: more
could only be a second answer. A chunked answer's framing would be read as bytes, and hash
wrong: never a wrong byte, a failed download.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import aiohttp

BODY_STALL = 30.0  # seconds without a byte of the body, then the download fails (readers wait longer)
READ_BUFFER = 1 << 20  # bytes of one buffer: received into, then written and hashed at once
BUFFERS = 4  # buffers of one body: the one filling, the others being written and hashed
FLUSH_EVERY = 0.2  # seconds a slow body's bytes wait for the rest of their buffer, at most (readers wait for them)


class BodyFailed(Exception):
    """The body did not come whole: the upstream ended it early or closed the connection."""


async def receive_body(response: aiohttp.ClientResponse, path: str, size: int, algorithm: str) -> tuple[int, str]:
    """The `size` bytes of the body of `response` (its headers read) into the file at `path`
    (which must exist: one the proxy removed is a failed spool): the bytes written and their
    digest. The response is closed on the way out: its connection carried a protocol of ours."""
    fd = os.open(path, os.O_WRONLY)  # no O_CREAT
    hasher = hashlib.new(algorithm)
    with ThreadPoolExecutor(1, "regcache-spool-write") as writer, ThreadPoolExecutor(1, "regcache-spool-hash") as hashing:
        body = SpoolBody(size, lambda piece: writer.submit(write_all, fd, piece),
                         lambda piece: hashing.submit(hasher.update, piece))
        try:
            # What aiohttp read with the headers (a few hundred KiB at most: its flow control)
            # is the body's start; the rest comes to SpoolBody.
            body.take_start(b"".join(iter(response.content.read_nowait, b"")))
            if body.received < size:
                if response.connection is None or response.connection.transport is None:
                    raise BodyFailed(f"the upstream closed the connection after {body.received} of {size} bytes")
                body.attach(response.connection.transport)
            await body.finished
        finally:
            body.stop()
            response.close()  # never back to the pool: aiohttp's parser did not see the body
            writer.submit(os.close, fd)
    return body.received, f"{algorithm}:{hasher.hexdigest()}"


def write_all(fd: int, piece: memoryview) -> None:
    while piece:
        piece = piece[os.write(fd, piece):]


class SpoolBody(asyncio.BufferedProtocol):
    """Receives `size` bytes into its buffers; `write(piece)` and `hash(piece)` start each
    buffer's write and hash elsewhere (concurrent.futures.Future). `finished` is done once every
    byte is written and hashed, or fails with the reason the body did not come whole."""

    def __init__(self, size: int, write: Callable[[memoryview], Future], hash: Callable[[memoryview], Future]) -> None:
        self.loop = asyncio.get_running_loop()
        self.size, self.write, self.hash = size, write, hash
        self.received = 0
        self.free = collections.deque(memoryview(bytearray(READ_BUFFER)) for _ in range(BUFFERS))
        self.buffer: memoryview | None = self.free.popleft()  # None: every buffer is being written
        self.filled = 0
        self.pending = 0  # writes and hashes under way
        self.transport: asyncio.Transport | None = None
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.flush_timer: asyncio.TimerHandle | None = None
        self.last_byte = self.loop.time()
        self.stall_timer = self.loop.call_at(self.last_byte + BODY_STALL, self._check_stall)

    def take_start(self, data: bytes) -> None:
        """The body's first bytes, read before this protocol had the connection: written first."""
        if len(data) > self.size:
            raise BodyFailed(f"the body is longer than its {self.size} bytes")
        if data:
            self.received = len(data)
            self._start(memoryview(data), None)
        self._check_finished()

    def attach(self, transport: asyncio.Transport) -> None:
        """Receive the rest of the body from `transport`, instead of aiohttp's protocol (which
        may have paused it)."""
        self.transport = transport
        transport.set_protocol(self)
        transport.resume_reading()

    def stop(self) -> None:
        """No more timers; the caller closes the connection."""
        for timer in (self.flush_timer, self.stall_timer):
            if timer is not None:
                timer.cancel()
        if not self.finished.done():
            self.finished.cancel()

    # asyncio.BufferedProtocol

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never past the Content-Length: the reading pauses there, and a buffer is never empty here.
        return self.buffer[self.filled:self.filled + self.size - self.received]

    def buffer_updated(self, nbytes: int) -> None:
        starts = self.filled == 0
        self.filled += nbytes
        self.received += nbytes
        self.last_byte = self.loop.time()
        if self.received == self.size or self.filled == len(self.buffer):
            self._flush()
        elif starts:
            self.flush_timer = self.loop.call_later(FLUSH_EVERY, self._flush)

    def eof_received(self) -> None:
        self._fail(BodyFailed(f"the upstream ended the body after {self.received} of {self.size} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.received < self.size:
            self._fail(exc or BodyFailed(f"the connection closed after {self.received} of {self.size} bytes"))

    # the buffers

    def _flush(self) -> None:
        """The current buffer's bytes to the file; the next buffer, or a pause until one is free."""
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        if not self.filled:
            return
        self._start(self.buffer[:self.filled], self.buffer)
        self.filled = 0
        self.buffer = self.free.popleft() if self.free else None
        if self.buffer is None or self.received == self.size:
            self.transport.pause_reading()

    def _start(self, piece: memoryview, buffer: memoryview | None) -> None:
        """Write and hash `piece`; then `buffer` (its memory) is free again."""
        self.pending += 1
        job = asyncio.gather(asyncio.wrap_future(self.write(piece)), asyncio.wrap_future(self.hash(piece)))
        job.add_done_callback(lambda job: self._written(job, buffer))

    def _written(self, job: asyncio.Future, buffer: memoryview | None) -> None:
        self.pending -= 1
        if job.cancelled() or job.exception() is not None:  # the disk failed, or the spool went
            self._fail(BodyFailed("the write was cancelled") if job.cancelled() else job.exception())
            return
        if buffer is not None:
            self.free.append(buffer)
            if self.buffer is None and self.received < self.size and not self.finished.done():
                self.buffer = self.free.popleft()
                self.last_byte = self.loop.time()  # the pause was the disk's, not the upstream's
                self.transport.resume_reading()
        self._check_finished()

    def _check_finished(self) -> None:
        if self.received == self.size and not self.pending and not self.finished.done():
            self.finished.set_result(None)

    def _check_stall(self) -> None:
        if self.buffer is None:  # waiting for the disk
            self.last_byte = self.loop.time()
        idle = self.loop.time() - self.last_byte
        if idle >= BODY_STALL:
            self._fail(TimeoutError(f"no byte of the body for {BODY_STALL:.0f}s"))
        else:
            self.stall_timer = self.loop.call_at(self.last_byte + BODY_STALL, self._check_stall)

    def _fail(self, error: BaseException) -> None:
        if not self.finished.done():
            self.finished.set_exception(error)
