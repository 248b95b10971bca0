"""A file written and hashed piece by piece on threads of its own (hashed_file.py): the pieces
land in order with their digest, a failing write fails its piece, and the file is closed only
once the writes submitted are done, even when the wait for it is cancelled."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

import pytest

from regcache_core.hashed_file import HashedFile


def test_pieces_land_in_order_with_their_digest(tmp_path):
    data = os.urandom(3 << 20)
    cuts = [0, 1, 4096, 70_000, 1 << 20, (1 << 20) + 17, 2 << 20, len(data)]
    path = tmp_path / "file"
    path.write_bytes(b"")

    async def run() -> str:
        fd = os.open(path, os.O_WRONLY)
        file = HashedFile(fd, "sha512", "test-file")
        await asyncio.gather(*(file.submit(memoryview(data)[a:b]) for a, b in zip(cuts, cuts[1:])))
        await file.close(lambda: os.close(fd))
        return file.digest()

    assert asyncio.run(run()) == "sha512:" + hashlib.sha512(data).hexdigest()
    assert path.read_bytes() == data


def test_a_failing_write_fails_its_piece_and_the_file_still_closes(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"")
    closed = []

    async def run() -> None:
        fd = os.open(path, os.O_RDONLY)  # no write succeeds
        file = HashedFile(fd, "sha256", "test-file")
        pieces = [file.submit(memoryview(b"x" * 1000)), file.submit(memoryview(b"y" * 1000))]
        for piece in pieces:
            with pytest.raises(OSError):
                await piece
        await file.close(lambda: closed.append(os.close(fd)))

    asyncio.run(run())
    assert closed == [None] and path.read_bytes() == b""


def test_the_file_is_closed_only_after_the_writes_in_flight_even_if_the_wait_is_cancelled():
    piece = os.urandom(4 << 20)  # far more than a pipe holds: its write waits for the reader
    events: list[str] = []

    async def run() -> tuple[bytes, set[str]]:
        read_end, write_end = os.pipe()
        file = HashedFile(write_end, "sha256", "test-file")
        written = file.submit(memoryview(piece))
        threads = {t.name for t in threading.enumerate()}

        def closing() -> None:
            events.append("closed")
            os.close(write_end)

        closing_task = asyncio.ensure_future(file.close(closing))
        await asyncio.sleep(0.1)
        assert events == [] and not written.done(), "nobody reads the pipe: its write cannot be done"
        closing_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing_task

        def read_all() -> bytes:
            with open(read_end, "rb") as pipe:
                return pipe.read()  # to the end: the write end closed

        received = await asyncio.to_thread(read_all)
        await written
        return received, threads

    received, threads = asyncio.run(run())
    assert received == piece and events == ["closed"]
    assert {"test-file-write_0", "test-file-hash_0"} <= threads
