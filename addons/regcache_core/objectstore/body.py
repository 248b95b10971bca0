"""An object's body, from the store's connection to a reader (blobs.py's `stream`), received into
reused buffers past aiohttp's StreamReader (http_body.py: how, and why).

A reader is handed a filled buffer (a memoryview of it), or what has arrived when none filled
within FLUSH_AFTER of its asking; it stays the reader's until it has asked for `held` more (1:
until the next), while the others fill. A reader that writes pieces elsewhere (copies.py) holds
a few, so the store's connection is read while they are written. A body that brings no byte
for the caller's timeout, ends short of its length, or whose connection closes early fails as
the store being unreachable (StoreUnreachable).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import aiohttp

from ..http_body import BUFFERS, BufferedBody
from .client import StoreUnreachable

FLUSH_AFTER = 0.05  # seconds a reader waits for a full buffer before taking what has arrived


async def body_pieces(response: aiohttp.ClientResponse, size: int, timeout: float,
                      held: int = 1, buffers: int = BUFFERS) -> AsyncIterator[memoryview]:
    """The `size` bytes of `response`'s body (its headers read), in pieces: each valid until
    `held` more are asked for (fewer than `buffers`). Closes the response on the way out."""
    body = ObjectBody(size, timeout, held, buffers)
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
    def __init__(self, size: int, timeout: float, held: int = 1, buffers: int = BUFFERS) -> None:
        super().__init__(size, timeout, StoreUnreachable, StoreUnreachable, "the store", "object", buffers)
        if not 0 < held < buffers:
            raise ValueError(f"a reader holds 1 to {buffers - 1} pieces, not {held}")
        self.full: collections.deque[memoryview] = collections.deque()  # filled pieces, in order
        self.held: collections.deque[memoryview] = collections.deque()  # the pieces the reader has, oldest first
        self.holds = held
        self.changed = asyncio.Event()

    async def next_piece(self) -> memoryview | None:
        """The next filled buffer (or what has arrived, after FLUSH_AFTER); None at the end."""
        if len(self.held) == self.holds:
            self._give_back(self.held.popleft())
        flush_at = self.loop.time() + FLUSH_AFTER
        while True:
            if self.full:
                self.held.append(self.full.popleft())
                return self.held[-1]
            if self.failure is not None:
                raise self.failure
            if self.received == self.size and not self.used:
                return None
            if self.used and self.loop.time() >= flush_at:
                self.held.append(self._cut())
                return self.held[-1]
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
