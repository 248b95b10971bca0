"""The data plane's local copies of an object store's blobs (objectstore/copies.py), on a real
folder, with the store's read faked: one read however many GETs (in one worker or several),
its pieces written and hashed in order while their buffers are reused as body.py allows,
the bytes checked before a copy is whole, a dead writer's copy removed, the least recently served
copies going first, and the store's silence reported."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os

import pytest

from regcache_core.objectstore.client import StoreUnreachable
from regcache_core.objectstore.copies import LocalCopies, adopt
from regcache_core.spool.table import HOLD_BACK, SpoolBroken

BLOB = os.urandom(3 << 20)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
CHUNK = 256 << 10


class Store:
    """The object's reads: counted, each in chunks, waiting for `release` when it is given."""

    def __init__(self, body: bytes = BLOB, fail: Exception | None = None) -> None:
        self.body, self.fail = body, fail
        self.reads = 0
        self.release: asyncio.Event | None = None

    def read(self, held: int):
        self.reads += 1
        return self._chunks(held)

    async def _chunks(self, held: int):
        """In pieces of `held` buffers taking turns, each filled again when `held` more pieces
        are asked for: body.py's contract, at its tightest."""
        buffers = [bytearray(CHUNK) for _ in range(held)]
        for n, start in enumerate(range(0, len(self.body), CHUNK)):
            if self.release is not None:
                await self.release.wait()
            buffer, piece = buffers[n % held], self.body[start:start + CHUNK]
            buffer[:len(piece)] = piece
            yield memoryview(buffer)[:len(piece)]
            await asyncio.sleep(0)  # the writing threads run on meanwhile
        if self.fail is not None:
            raise self.fail


async def whole(copy, size: int) -> bytes:
    """What a reader sends of `copy`: as far as it may, until the end."""
    sent = 0
    while copy.progress is not None and sent < size:
        sent = await copy.progress.ready(sent)
    return os.pread(copy.file.fileno(), size, 0)


def test_one_read_fills_a_copy_that_concurrent_and_later_gets_are_sent(tmp_path):
    async def run():
        store = Store()
        store.release = asyncio.Event()
        first, second = LocalCopies(tmp_path, 64 << 20), LocalCopies(tmp_path, 64 << 20)  # two workers
        copies = [await first.open(DIGEST, len(BLOB), store.read, start=True) for _ in range(3)]
        copies.append(await second.open(DIGEST, len(BLOB), store.read, start=True))
        store.release.set()
        bodies = await asyncio.gather(*(whole(c, len(BLOB)) for c in copies))
        later = await second.open(DIGEST, len(BLOB), store.read, start=True)
        ranged = await first.open(DIGEST, len(BLOB), store.read, start=False)
        for copy in [*copies, later, ranged]:
            copy.file.close()
        await first.close()
        return store.reads, bodies, later, ranged

    reads, bodies, later, ranged = asyncio.run(run())
    assert reads == 1 and all(body == BLOB for body in bodies)
    assert later.progress is None and ranged.progress is None  # sealed: sent as it is
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock")] == [DIGEST.replace(":", "-")]


def test_a_copy_whose_bytes_do_not_hash_to_the_digest_is_never_whole_and_goes(tmp_path):
    async def run():
        copies = LocalCopies(tmp_path, 64 << 20)
        wrong = bytearray(BLOB)
        wrong[-1] ^= 1
        copy = await copies.open(DIGEST, len(BLOB), Store(bytes(wrong)).read, start=True)
        released = 0
        with pytest.raises(SpoolBroken):
            while True:
                released = await copy.progress.ready(released)
        copy.file.close()
        return released

    assert asyncio.run(run()) <= len(BLOB) - HOLD_BACK  # the last bytes never went out
    assert not (tmp_path / DIGEST.replace(":", "-")).exists()


def test_a_range_alone_starts_no_copy(tmp_path):
    async def run():
        store = Store()
        copy = await LocalCopies(tmp_path, 64 << 20).open(DIGEST, len(BLOB), store.read, start=False)
        return copy, store.reads

    assert asyncio.run(run()) == (None, 0)


def test_the_store_failing_mid_copy_cuts_its_readers_and_is_reported(tmp_path):
    reported = []

    async def run():
        copies = LocalCopies(tmp_path, 64 << 20, reported.append)
        copy = await copies.open(DIGEST, len(BLOB), Store(BLOB[:1 << 20], StoreUnreachable("timed out")).read,
                                 start=True)
        with pytest.raises(SpoolBroken):
            await whole(copy, len(BLOB))
        copy.file.close()

    asyncio.run(run())
    assert reported == ["timed out"]
    assert not (tmp_path / DIGEST.replace(":", "-")).exists()


def test_an_unfinished_copy_whose_writer_died_is_removed_and_made_again(tmp_path):
    path = tmp_path / DIGEST.replace(":", "-")
    path.write_bytes(BLOB[:1000])  # writable (not sealed), and nobody holds its lock

    async def run():
        store = Store()
        copies = LocalCopies(tmp_path, 64 << 20)
        copy = await copies.open(DIGEST, len(BLOB), store.read, start=True)
        body = await whole(copy, len(BLOB))
        copy.file.close()
        return store.reads, body

    assert asyncio.run(run()) == (1, BLOB)


def test_a_copy_still_being_written_elsewhere_is_followed(tmp_path):
    path = tmp_path / DIGEST.replace(":", "-")
    with open(path, "wb") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)  # a live writer, in another worker
        writer.write(BLOB[:1000])

        async def run():
            store = Store()
            copy = await LocalCopies(tmp_path, 64 << 20).open(DIGEST, len(BLOB), store.read, start=True)
            copy.file.close()
            return copy.progress is not None, store.reads

        assert asyncio.run(run()) == (True, 0)


def test_the_least_recently_served_copies_go_to_make_room_and_a_blob_over_the_bound_gets_none(tmp_path):
    blobs = [os.urandom(1 << 20) for _ in range(3)]
    digests = ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]

    async def run():
        copies = LocalCopies(tmp_path, (2 << 20) + 100)
        for n in (0, 1):
            copy = await copies.open(digests[n], len(blobs[n]), Store(blobs[n]).read, start=True)
            await whole(copy, len(blobs[n]))
            copy.file.close()
        os.utime(tmp_path / digests[1].replace(":", "-"), (1, 1))  # served long ago: it goes first
        (await copies.open(digests[0], len(blobs[0]), Store(blobs[0]).read, start=True)).file.close()
        copy = await copies.open(digests[2], len(blobs[2]), Store(blobs[2]).read, start=True)
        await whole(copy, len(blobs[2]))
        copy.file.close()
        too_big = await copies.open(DIGEST, len(BLOB), Store().read, start=True)
        return too_big

    assert asyncio.run(run()) is None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == sorted(
        d.replace(":", "-") for d in (digests[0], digests[2]))


def test_a_sealed_spool_is_kept_as_the_copy_by_a_second_link(tmp_path):
    spool = tmp_path / "spool"
    spool.write_bytes(BLOB)
    spool.chmod(0o400)  # sealed: its bytes checked (spool/table.py)
    copies = tmp_path / "copies"
    assert adopt(copies, 64 << 20, spool, DIGEST, len(BLOB))
    assert not adopt(copies, 64 << 20, spool, DIGEST, len(BLOB))  # it has one
    assert not adopt(copies, len(BLOB) - 1, spool, "sha256:" + "0" * 64, len(BLOB))  # it would not fit
    spool.unlink()  # the spool goes after it lingered: the copy stays

    async def run():
        store = Store()
        copy = await LocalCopies(copies, 64 << 20).open(DIGEST, len(BLOB), store.read, start=True)
        copy.file.close()
        return copy.progress, store.reads

    assert asyncio.run(run()) == (None, 0)
    assert (copies / DIGEST.replace(":", "-")).read_bytes() == BLOB
