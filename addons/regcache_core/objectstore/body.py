"""An object's body, from the store's connection to a reader (blobs.py's `stream`), received into
reused buffers past aiohttp's StreamReader (http_body.py: how, and why).

A reader is handed a filled buffer (a memoryview of it), or what has arrived when none filled
within FLUSH_AFTER of its asking; it stays the reader's until it asks for the next one, while
the others fill. A body that brings no byte for the caller's timeout, ends short of its length,
or whose connection closes early fails as the store being unreachable (StoreUnreachable).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import aiohttp

from ..http_body import BufferedBody
from .client import StoreUnreachable

FLUSH_AFTER = 0.05  # seconds a reader waits for a full buffer before taking what has arrived


async def body_pieces(response: aiohttp.ClientResponse, size: int, timeout: float) -> AsyncIterator[memoryview]:
    """The `size` bytes of `response`'s body (its headers read), in pieces: each valid until the
    next is asked for. Closes the response on the way out."""
    body = ObjectBody(size, timeout)
    try:
        start = body.take_over(response)
        if start:
            yield memoryview(start)
        while (piece := await body.next_piece()) is not None:
            yield piece
    finally:
        body.stop()
        response.close()


class ObjectBody(BufferedBody):
    def __init__(self, size: int, timeout: float) -> None:
        super().__init__(size, timeout, StoreUnreachable, StoreUnreachable, "the store", "object")
        self.full: collections.deque[memoryview] = collections.deque()  # filled pieces, in order
        self.held: memoryview | None = None  # the piece the reader has
        self.changed = asyncio.Event()

    async def next_piece(self) -> memoryview | None:
        """The next filled buffer (or what has arrived, after FLUSH_AFTER); None at the end."""
        if self.held is not None:
            self._give_back(self.held)
            self.held = None
        flush_at = self.loop.time() + FLUSH_AFTER
        while True:
            if self.full:
                self.held = self.full.popleft()
                return self.held
            if self.failure is not None:
                raise self.failure
            if self.received == self.size and not self.used:
                return None
            if self.used and self.loop.time() >= flush_at:
                self.held = self._cut()
                return self.held
            self.changed.clear()
            try:
                async with asyncio.timeout_at(flush_at if self.used else None):
                    await self.changed.wait()
            except TimeoutError:
                pass

    def _filled(self, piece: memoryview) -> None:
        self.full.append(piece)
        self.changed.set()

    def _arrived(self, first: bool) -> None:
        self.changed.set()

    def _failed(self) -> None:
        self.changed.set()
