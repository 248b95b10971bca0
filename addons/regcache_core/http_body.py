"""An HTTP answer's body received into a few reused buffers, past aiohttp's StreamReader: the
mechanics shared by the spool's download (spool/body.py: written and hashed) and the object
store's reads (objectstore/body.py: handed to a reader).

Once aiohttp has read the answer's headers (redirects, credentials and deadlines are its and
its callers'), `BufferedBody`, an asyncio.BufferedProtocol, is put on the answer's connection and
the loop receives the bytes straight into BUFFERS preallocated buffers of READ_BUFFER bytes (from
the socket, or from asyncio's TLS layer, which decrypts into them). Measured: the StreamReader
made a bytes object per read (fresh memory: page faults in every receive), copied again to make
a MiB, and paused and resumed the transport at its 128 KiB high-water mark. Reading, writing and
hashing 512 MiB from nginx on loopback took 1.4-1.9 CPU s that way, 1.05-1.2 here (the loop's
reads average about 750 KiB: a few hundred callbacks per 512 MiB); during a blob's first read
from the object store through the data plane (copy written, hashed and sent), the StreamReader
and its parser were the busiest part of the worker's event loop.

A consumer gets each buffer's bytes when it is full, or earlier on its own flush interval, and
gives the buffer back when done with it; the connection stops being read while no buffer is free
(then no byte is not a stall) and once the body is whole. Memory per body: BUFFERS * READ_BUFFER
(or the buffers its consumer asks for). Bounded as the StreamReader read was: a body that brings
no byte for `stall` seconds fails, as does one that ends short of its length or whose connection
closes early: never a short body passed off as complete. Exactly the length asked for is read
(more could only be a second answer); the connection is closed afterwards (aiohttp's parser
never saw the body), never reused. A chunked answer's framing would be read as bytes: a failed
transfer, never a wrong byte taken as right (the consumers check digests).
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp

READ_BUFFER = 1 << 20  # bytes of one buffer
BUFFERS = 4  # buffers of one body: the one filling, the others with the consumer


class BufferedBody(asyncio.BufferedProtocol):
    """Receives `size` bytes into its buffers. A consumer subclass gets each full buffer (and
    the last bytes) through `_filled(piece)`, may cut a part-filled one short with `_cut()`, and
    returns each piece's buffer with `_give_back(piece)`; failures reach `_failed()`, recorded in
    `failure` as `failure_type` (a stall as `stall_type`), worded about `peer` and `noun`."""

    def __init__(self, size: int, stall: float, failure_type: type[Exception], stall_type: type[Exception],
                 peer: str, noun: str, buffers: int = BUFFERS) -> None:
        self.loop = asyncio.get_running_loop()
        self.size, self.stall = size, stall
        self.failure_type, self.stall_type, self.peer, self.noun = failure_type, stall_type, peer, noun
        self.received = 0
        self.free = collections.deque(memoryview(bytearray(READ_BUFFER)) for _ in range(buffers))
        self.buffer: memoryview | None = self.free.popleft()  # the one filling; None: every buffer is held
        self.used = 0  # bytes of `buffer` filled
        self.failure: BaseException | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.last_byte = self.loop.time()
        self.stall_timer = self.loop.call_at(self.last_byte + stall, self._check_stall)

    def take_over(self, response: aiohttp.ClientResponse) -> bytes:
        """The body's start, which aiohttp read with the headers (a few hundred KiB at most: its
        flow control); the rest comes to this protocol, which takes the connection before
        anything else runs."""
        start = b"".join(iter(response.content.read_nowait, b""))
        if len(start) > self.size:
            raise self.failure_type(f"{self.peer} sent more than the {self.size} bytes asked for")
        self.received = len(start)
        if self.received < self.size:
            if response.connection is None or response.connection.transport is None:
                raise self.failure_type(f"{self.peer} closed the connection after {self.received} of {self.size} bytes")
            self.transport = response.connection.transport
            self.transport.set_protocol(self)
            self.transport.resume_reading()  # aiohttp's protocol may have paused it
        return start

    def stop(self) -> None:
        """No more timers, and the connection closed: it reads no more, at once."""
        self.stall_timer.cancel()
        if self.transport is not None:
            self.transport.close()

    # for the consumer

    def _cut(self) -> memoryview:
        """The filling buffer's bytes, handed out now; the next buffer, or a pause."""
        piece, self.used = self.buffer[:self.used], 0
        self._next_buffer()
        return piece

    def _give_back(self, piece: memoryview) -> None:
        """`piece`'s buffer (one `_cut` made) is free again."""
        self.free.append(memoryview(piece.obj))
        if self.buffer is None and self.received < self.size and self.failure is None:
            self.last_byte = self.loop.time()  # the pause was the consumer's, not the peer's
            self._next_buffer()

    def _filled(self, piece: memoryview) -> None:
        raise NotImplementedError

    def _failed(self) -> None:
        raise NotImplementedError

    def _fail(self, failure: BaseException) -> None:
        if self.failure is None:
            self.failure = failure
            self._failed()

    def _next_buffer(self) -> None:
        """A free buffer to fill next, or the connection paused until one is given back (or for
        good once the body is whole)."""
        self.buffer = self.free.popleft() if self.free else None
        if self.transport is None:
            return
        if (self.buffer is None or self.received == self.size) and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        elif self.buffer is not None and self.received < self.size and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def _check_stall(self) -> None:
        if self.buffer is None or self.received == self.size:  # waiting for the consumer, or whole
            self.last_byte = self.loop.time()
        if self.loop.time() - self.last_byte >= self.stall:
            self._fail(self.stall_type(f"no byte of the {self.noun} for {self.stall:.0f}s"))
        else:
            self.stall_timer = self.loop.call_at(self.last_byte + self.stall, self._check_stall)

    # asyncio.BufferedProtocol

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never past the length: the reading pauses there, and a buffer is never full here.
        return self.buffer[self.used:self.used + self.size - self.received]

    def buffer_updated(self, nbytes: int) -> None:
        self.used += nbytes
        self.received += nbytes
        self.last_byte = self.loop.time()
        if self.used == len(self.buffer) or self.received == self.size:
            self._filled(self._cut())
        else:
            self._arrived(self.used == nbytes)

    def _arrived(self, first: bool) -> None:
        """Bytes that did not fill the buffer arrived (the buffer's `first`)."""

    def eof_received(self) -> bool:
        self._fail(self.failure_type(f"{self.peer} ended the body after {self.received} of {self.size} bytes"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.received < self.size:
            failure = self.failure_type(
                f"the connection to {self.peer} closed after {self.received} of {self.size} bytes")
            failure.__cause__ = exc
            self._fail(failure)
