"""An object's whole body read from the store as several ranged GETs at once (parts), for a
local copy's first read (copies.py): REGCACHE_S3_READ_PARTS of them in flight, each
REGCACHE_S3_READ_PART_SIZE bytes. AWS S3 serves one connection roughly 85-100 MB/s and
recommends parallel byte-range GETs for more; registry:2 (redirect off) streams each blob over
one connection, so a first read by parts goes up to `parts` times as fast on such a store.

The bytes are handed on in order, with blobs.py's `stream` contract: pieces each valid until
`held` more are asked for. Each part is a `stream` of its own range with its own buffers, as
many as its bytes need (one spare, for a first piece cut short): a part ahead of the one being
handed on receives its whole range into them, and pauses there (TCP flow control) until its
turn; a part's buffers are not filled again once its range is whole, so its pieces stay valid
after it ends. Memory per read: `parts` x (part size + 1 MiB), and the pieces the reader still
holds of the part before; each part's buffers are new (allocating them costs little: 0.04 CPU s
per 288 MiB of 1 MiB buffers, glibc reusing the freed ones). GETs per read: the object's size /
part size (S3 bills GETs by the request). Every part has the store's deadline; a part that fails
or ends short fails the whole read (StoreUnreachable, OSError), as one GET's would. An object
smaller than two parts is read by one GET, as is every object with REGCACHE_S3_READ_PARTS=1.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

from ..config import ObjectStore
from ..http_body import READ_BUFFER
from .blobs import StoredBlob, StoredBlobs


async def read_whole(blobs: StoredBlobs, store: ObjectStore, blob: StoredBlob, held: int) -> AsyncIterator[memoryview]:
    """The object's `blob.size` bytes in order, in pieces each valid until `held` more are asked for."""
    parts, part_size = blobs.access.read_parts, blobs.access.read_part_size
    if parts < 2 or blob.size < 2 * part_size:
        async for piece in blobs.stream(store, blob, 0, blob.size, held):
            yield piece
        return
    buffers = max(held + 1, -(-part_size // READ_BUFFER) + 1)
    ranges = collections.deque((start, min(part_size, blob.size - start)) for start in range(0, blob.size, part_size))
    started: collections.deque[tuple[AsyncIterator[memoryview], asyncio.Task]] = collections.deque()

    def start_next() -> None:
        """The next range's GET, on its way: its answer's head and first piece, in a task."""
        start, count = ranges.popleft()
        stream = blobs.stream(store, blob, start, count, held, buffers)
        started.append((stream, asyncio.ensure_future(anext(stream))))

    try:
        while ranges and len(started) < parts:
            start_next()
        while started:
            stream, first = started[0]
            yield await first
            async for piece in stream:
                yield piece
            started.popleft()
            if ranges:
                start_next()
    finally:
        for _, first in started:
            first.cancel()
        await asyncio.gather(*(first for _, first in started), return_exceptions=True)
        for stream, _ in started:
            await stream.aclose()
