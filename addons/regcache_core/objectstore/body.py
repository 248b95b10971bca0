"""An object's body, from the store's connection into a few preallocated buffers (blobs.py's
`stream`).

Once aiohttp has read the answer's headers, the body skips aiohttp's StreamReader: `ObjectBody`,
an asyncio.BufferedProtocol, is put on the answer's connection and the loop receives the bytes
straight into BUFFERS buffers of READ_BUFFER bytes, reused. The StreamReader made a new bytes
object per read (256 KiB, fresh memory: page faults in every receive) and its parser handled each
one; profiled during a blob's first read through the data plane (copy written, hashed and sent),
that was the busiest part of the worker's event loop.

A reader is handed a filled buffer (a memoryview of it), or what has arrived when none filled
within FLUSH_AFTER; it stays the reader's until it asks for the next one, while the others fill.
Memory per transfer: BUFFERS * READ_BUFFER; the connection stops being read when every buffer
is full or held. Every wait for bytes has the caller's deadline; a body that ends short of its
length, or a connection closed early, fails (StoreUnreachable): never a short body passed off as
complete. Exactly the length asked for is read; the connection is closed afterwards (aiohttp's
parser never saw the body), never reused.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import aiohttp

from .client import StoreUnreachable

READ_BUFFER = 1 << 20  # bytes of one buffer
BUFFERS = 4  # buffers of one transfer: the reader's, and those filling meanwhile
FLUSH_AFTER = 0.05  # seconds a reader waits for a full buffer before taking what has arrived


async def body_pieces(response: aiohttp.ClientResponse, size: int, timeout: float) -> AsyncIterator[memoryview]:
    """The `size` bytes of `response`'s body (its headers read), in pieces: each valid until the
    next is asked for. Closes the response on the way out."""
    body = ObjectBody(size)
    try:
        # What aiohttp read with the headers is the body's start; the rest comes to ObjectBody,
        # which takes the connection before anything else runs.
        start = b"".join(iter(response.content.read_nowait, b""))
        if len(start) > size:
            raise OSError(f"the object store sent more than the {size} bytes asked for")
        body.received = len(start)
        if body.received < size:
            if response.connection is None or response.connection.transport is None:
                raise StoreUnreachable(f"the store closed the connection after {body.received} of {size} bytes")
            body.attach(response.connection.transport)
        if start:
            yield memoryview(start)
        while (piece := await body.next_piece(timeout)) is not None:
            yield piece
    finally:
        body.stop()
        response.close()


class ObjectBody(asyncio.BufferedProtocol):
    def __init__(self, size: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.size = size
        self.received = 0
        self.free = collections.deque(memoryview(bytearray(READ_BUFFER)) for _ in range(BUFFERS))
        self.filled: collections.deque[memoryview] = collections.deque()  # full ones, in order
        self.buffer: memoryview | None = self.free.popleft()  # the one filling; None: all full or held
        self.used = 0  # bytes of `buffer` filled
        self.held: memoryview | None = None  # the buffer the reader has
        self.failure: BaseException | None = None
        self.changed = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        self.paused = False

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_protocol(self)
        transport.resume_reading()  # aiohttp's protocol may have paused it

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()  # reads no more, at once

    async def next_piece(self, timeout: float) -> memoryview | None:
        """The next filled buffer (or what has arrived, after FLUSH_AFTER); None at the end."""
        self._give_back()
        deadline = self.loop.time() + timeout
        flush_at = self.loop.time() + FLUSH_AFTER
        while True:
            if self.filled:
                return self._hand(self.filled.popleft())
            if self.failure is not None:
                raise self.failure
            if self.received == self.size and not self.used:
                return None
            now = self.loop.time()
            if self.used and now >= flush_at:
                piece, self.used = self.buffer[:self.used], 0
                self._next_buffer()
                return self._hand(piece)
            if now >= deadline:
                raise StoreUnreachable(f"no byte of the object for {timeout:.0f}s")
            self.changed.clear()
            try:
                async with asyncio.timeout_at(min(deadline, flush_at) if self.used else deadline):
                    await self.changed.wait()
            except TimeoutError:
                pass

    def _hand(self, piece: memoryview) -> memoryview:
        self.held = piece
        return piece

    def _give_back(self) -> None:
        if self.held is not None:
            self.free.append(memoryview(self.held.obj))
            self.held = None
            if self.buffer is None and self.received < self.size:
                self._next_buffer()

    def _next_buffer(self) -> None:
        """A free buffer to fill next, or the connection paused until one is given back."""
        self.buffer = self.free.popleft() if self.free else None
        if self.transport is None:
            return
        if self.buffer is None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        elif self.buffer is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    # asyncio.BufferedProtocol

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never past the length asked for; a buffer is never full here.
        return self.buffer[self.used:self.used + self.size - self.received]

    def buffer_updated(self, nbytes: int) -> None:
        self.used += nbytes
        self.received += nbytes
        if self.used == len(self.buffer) or self.received == self.size:
            self.filled.append(self.buffer[:self.used])
            self.used = 0
            self._next_buffer()
        self.changed.set()

    def eof_received(self) -> bool:
        self._fail(StoreUnreachable(f"the store ended the body after {self.received} of {self.size} bytes"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.received < self.size:
            self._fail(StoreUnreachable(f"the connection to the store closed after {self.received} of {self.size} bytes"))

    def _fail(self, failure: BaseException) -> None:
        if self.failure is None:
            self.failure = failure
        self.changed.set()
