"""A file written and hashed piece by piece, in order, on two threads of its own: the spool's
download (spool/body.py) and the data plane's copy of an object-store blob
(objectstore/copies.py), each with a few pieces in flight while the next ones arrive.

The hash runs beside the write, on its own thread, so that the bytes reach the file (and the
readers following it) without waiting for it. Measured on the copies: one thread doing both
served 8 clients' first read slower (890-930 MB/s against 910-1280 on a busy box).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class HashedFile:
    """The open file `fd`, written from its offset on and hashed with `algorithm`; its threads
    are named `<threads>-write` and `<threads>-hash`."""

    def __init__(self, fd: int, algorithm: str, threads: str) -> None:
        self._fd = fd
        self._hasher = hashlib.new(algorithm)
        self._writing = ThreadPoolExecutor(1, f"{threads}-write")
        self._hashing = ThreadPoolExecutor(1, f"{threads}-hash")

    def submit(self, piece: memoryview) -> asyncio.Future[None]:
        """Write and hash `piece` after the pieces submitted before it. Done once both are (the
        piece may change then, not before); failed with the write's error (the disk's)."""
        return asyncio.gather(asyncio.wrap_future(self._writing.submit(_write_all, self._fd, piece)),
                              asyncio.wrap_future(self._hashing.submit(self._hasher.update, piece)))

    def digest(self) -> str:
        """`algorithm:hex` of the pieces hashed: once every piece's future is done."""
        return f"{self._hasher.name}:{self._hasher.hexdigest()}"

    async def close(self, closing: Callable[[], None]) -> None:
        """No more pieces: `closing()`, which closes the file, runs on the write thread once the
        writes submitted are done (a cancelled wait does not stop one), so none lands after it,
        whatever happens to this wait; then the threads end."""
        closed = self._writing.submit(closing)
        self._writing.shutdown(wait=False)
        self._hashing.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(closed))


def _write_all(fd: int, piece: memoryview) -> None:
    while piece:
        piece = piece[os.write(fd, piece):]
