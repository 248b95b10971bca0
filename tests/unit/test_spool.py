"""Single-flight spools without mitmproxy: the table of spools and the spool file protocol
(spool.py), on real files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

import pytest

from regcache_core.spool import changes as changes_module
from regcache_core.spool import table as table_module
from regcache_core.spool.blob_heads import BlobHead, HeadFlights, blob_head
from regcache_core.spool.changes import _per_loop
from regcache_core.spool.table import (
    HOLD_BACK, WRITABLE, SpoolBroken, SpoolProgress, SpoolTable, clients_done, clients_reading, hold_as_reader, spool_path,
)

BLOB = os.urandom(3 << 20)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
KEY = ("docker.io", "library/big", DIGEST)
CHUNK = 64 << 10


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def read_all(path, size=len(BLOB), sent: list | None = None, **options) -> bytes:
    """What a data-plane reader sends of a spool: the bytes up to each end `ready` gives (it
    sends them by sendfile; read here). `sent` gets how many bytes went so far."""
    sent = [] if sent is None else sent
    with open(path, "rb") as file:
        progress = SpoolProgress(file.fileno(), size, **options)
        data = b""
        while len(data) < size:
            end = await progress.ready(len(data))
            data += os.pread(file.fileno(), end - len(data), len(data))
            sent.append(len(data))
        return data


async def spooling(table: SpoolTable, written: bytes):
    """A spool of KEY whose download got its 200 and wrote `written` so far."""
    spool, _ = table.claim(KEY)
    assert await table.start(spool, len(BLOB), "application/octet-stream")
    append(spool.path, written)
    return spool


def append(path, data: bytes) -> None:
    """What the download worker does with a spool's body: appends to the file the proxy made."""
    with open(path, "ab", 0) as file:
        file.write(data)


async def until(condition, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_gets_wait_for_the_downloads_headers_then_follow_its_spool_while_it_grows(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30, linger=0.2)
        spool, new = table.claim(KEY)
        assert new
        assert table.claim(KEY) == (spool, False), "one spool per key: one download"
        follower = asyncio.create_task(table.follow(spool))
        await asyncio.sleep(0.05)
        assert not follower.done(), "a GET waits for the download's answer headers"
        assert await table.start(spool, len(BLOB), "application/vnd.oci.image.layer.v1.tar")
        assert await follower
        assert table.get(KEY) is spool and spool.content_type == "application/vnd.oci.image.layer.v1.tar"
        reader = asyncio.create_task(read_all(spool.path))
        for offset in range(0, len(BLOB), CHUNK):
            append(spool.path, BLOB[offset:offset + CHUNK])
            await asyncio.sleep(0)
        await table.finish(spool, len(BLOB), DIGEST)
        assert await reader == BLOB
        assert await table.follow(table.claim(KEY)[0]), "a completed spool serves GETs while it lingers"
        await until(lambda: not spool.path.exists())  # a completed spool is removed after it lingered
        assert table.claim(KEY)[1], "the next GET starts a new download"

    run(scenario())


@pytest.mark.parametrize("outcome", ["declined", "failed before headers"])
def test_gets_go_upstream_themselves_when_the_download_has_no_body(tmp_path, outcome):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30)
        spool, _ = table.claim(KEY)
        followers = [asyncio.create_task(table.follow(spool)) for _ in range(3)]
        await asyncio.sleep(0.01)
        if outcome == "declined":  # a 404, say
            table.decline(spool)
        else:
            table.fail(spool, "connection refused")
        assert [await f for f in followers] == [False] * 3
        assert len(table) == 0 and not spool.path.exists()

    run(scenario())


def test_a_download_failing_midway_cuts_its_readers_and_leaves_no_file(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30)
        spool = await spooling(table, BLOB[:CHUNK * 3])
        reader = asyncio.create_task(read_all(spool.path))
        await asyncio.sleep(0.1)
        assert not reader.done(), "a reader waits for a spool that is still growing"
        table.fail(spool, "upstream reset the connection")
        with pytest.raises(SpoolBroken, match="download failed"):
            await reader
        await until(lambda: len(table) == 0)
        assert list((tmp_path / "spools").iterdir()) == []
        assert table.claim(KEY)[1], "the next GET downloads afresh"

    run(scenario())


def test_a_get_just_after_a_spool_failed_gets_a_new_one_made_after_the_old_file_is_gone(tmp_path, monkeypatch):
    """The next GET of a failed spool's blob follows a new download at once, even while the old
    file's unlink is still on its way (a loaded machine); the new file, of the same name, is made
    after that unlink, which would remove it otherwise."""
    unlink = threading.Event()
    remove_file = table_module.remove_file
    monkeypatch.setattr(table_module, "remove_file", lambda path: unlink.wait(10) and remove_file(path))

    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30)
        failed = await spooling(table, BLOB[:CHUNK])
        table.fail(failed, "the download worker exited")
        spool, new = table.claim(KEY)
        assert new and spool is not failed
        follower = asyncio.create_task(table.follow(spool))
        starting = asyncio.create_task(table.start(spool, len(BLOB), None))
        await asyncio.sleep(0.1)
        assert not starting.done(), "its file waits for the old one's unlink"
        unlink.set()
        assert await starting and await follower
        reader = asyncio.create_task(read_all(spool.path))
        append(spool.path, BLOB)
        await table.finish(spool, len(BLOB), DIGEST)
        assert await reader == BLOB

    run(scenario())


@pytest.mark.parametrize("body", ["short", "other bytes"])
def test_a_download_ending_short_or_hashing_wrong_fails_its_spool(tmp_path, body):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30)
        spool = await spooling(table, BLOB[:CHUNK])
        sent = []
        reader = asyncio.create_task(read_all(spool.path, sent=sent))
        await until(lambda: sent)  # the reader has the file open
        if body == "other bytes":
            append(spool.path, bytes(len(BLOB) - CHUNK))
            await table.finish(spool, len(BLOB), "sha256:" + hashlib.sha256(BLOB[:CHUNK] + bytes(len(BLOB) - CHUNK)).hexdigest())
        else:
            await table.finish(spool, CHUNK, DIGEST)
        with pytest.raises(SpoolBroken, match="download failed"):
            await reader
        assert max(sent, default=0) <= len(BLOB) - HOLD_BACK, "the last bytes of a spool that hashed wrong never went"
        assert not await table.follow(spool)
        await until(lambda: len(table) == 0)
        assert not spool.path.exists()

    run(scenario())


def test_over_the_disk_bound_a_blob_is_not_spooled_and_gets_go_upstream(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=len(BLOB) + 10)
        first, _ = table.claim(KEY)
        assert await table.start(first, len(BLOB), None)
        other = ("docker.io", "library/big", "sha256:" + "0" * 64)
        second, _ = table.claim(other)
        follower = asyncio.create_task(table.follow(second))
        await asyncio.sleep(0.01)
        assert not await table.start(second, 11, None), "both would be over the bound"
        assert not await follower
        await until(lambda: len(table) == 1)
        assert not await table.start(table.claim(other)[0], None, None), "no Content-Length, no spool"

    run(scenario())


def test_two_downloads_starting_at_once_do_not_both_pass_the_disk_bound(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=len(BLOB) + 10)
        first, _ = table.claim(KEY)
        second, _ = table.claim(("docker.io", "library/big", "sha256:" + "0" * 64))
        # Both check the bound before either has made its file (an await in the spool's thread).
        started = await asyncio.gather(table.start(first, len(BLOB), None), table.start(second, len(BLOB), None))
        assert started == [True, False]
        assert table.disk_in_use == len(BLOB)

    run(scenario())


def test_a_get_waits_a_bounded_time_for_the_downloads_headers(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30, follow_wait=0.1)
        spool, _ = table.claim(KEY)
        assert not await table.follow(spool)

    run(scenario())


def test_spools_of_an_earlier_run_are_removed_at_start(tmp_path):
    (tmp_path / "spools").mkdir()
    (tmp_path / "spools" / "leftover").write_bytes(b"x" * 100)
    SpoolTable(tmp_path / "spools", max_disk=1 << 30)
    assert list((tmp_path / "spools").iterdir()) == []


def grow(path, data: bytes, pause: float, unlink_at: int | None = None, seal: bool = True) -> threading.Thread:
    """Another process's writer, as the proxy is to a data-plane worker: appends in chunks, then
    seals the file (read-only) as a download whose bytes checked."""
    def write() -> None:
        with open(path, "wb", buffering=0) as f:
            for offset in range(0, len(data), CHUNK):
                if unlink_at is not None and offset >= unlink_at:
                    path.unlink()
                    return
                f.write(data[offset:offset + CHUNK])
                time.sleep(pause)
            if seal:
                os.fchmod(f.fileno(), 0o444)

    path.touch()
    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_a_reader_follows_a_growing_file_to_its_size(tmp_path):
    path = spool_path(tmp_path, KEY)
    grow(path, BLOB + b"more than the grant says", 0.002)
    assert run(read_all(path)) == BLOB


def test_a_reader_cuts_when_the_file_is_unlinked_short(tmp_path):
    path = spool_path(tmp_path, KEY)
    grow(path, BLOB, 0.002, unlink_at=len(BLOB) // 2)
    with pytest.raises(SpoolBroken, match="download failed"):
        run(read_all(path))


def test_a_reader_holds_the_last_bytes_back_until_the_spool_is_sealed(tmp_path):
    path = spool_path(tmp_path, KEY)
    grow(path, BLOB, 0, seal=False).join()
    sent = []

    async def scenario():
        reader = asyncio.create_task(read_all(path, sent=sent))
        await until(lambda: sent and sent[-1] == len(BLOB) - HOLD_BACK)
        await asyncio.sleep(0.1)
        assert not reader.done(), "every byte is there, but not yet checked"
        os.chmod(path, os.stat(path).st_mode & ~WRITABLE)
        assert await reader == BLOB

    run(scenario())


def test_a_reader_cuts_a_spool_that_stops_growing(tmp_path):
    path = spool_path(tmp_path, KEY)
    path.write_bytes(BLOB[:CHUNK])  # a writer that died: the file stays, and never grows
    with pytest.raises(SpoolBroken, match="no growth"):
        run(read_all(path, stall_timeout=0.3))


@pytest.mark.parametrize("change", ["seal", "unlink"])
def test_a_caught_up_reader_is_woken_by_the_seal_or_the_unlink_not_a_poll(tmp_path, change):
    path = spool_path(tmp_path, KEY)
    path.write_bytes(BLOB)  # every byte written, not yet checked
    never = 3600  # seconds: only the change can wake the readers within the test's bound

    async def scenario():
        with open(path, "rb") as file:
            readers = [SpoolProgress(file.fileno(), len(BLOB), poll=never) for _ in range(2)]
            waits = [asyncio.create_task(reader.ready(len(BLOB) - HOLD_BACK)) for reader in readers]
            await asyncio.sleep(0.05)
            assert not any(wait.done() for wait in waits), "the last bytes wait for the seal"
            if change == "seal":
                os.chmod(path, os.stat(path).st_mode & ~WRITABLE)
                assert [await wait for wait in waits] == [len(BLOB)] * 2
            else:
                path.unlink()
                for wait in waits:
                    with pytest.raises(SpoolBroken, match="download failed"):
                        await wait
            changes = _per_loop[asyncio.get_running_loop()]
            assert not changes.watchers and not changes.waiting, "no watch outlives its waits"

    run(scenario())


def test_without_inotify_a_reader_finds_the_seal_at_its_next_look(tmp_path, monkeypatch):
    monkeypatch.setattr(changes_module, "_changes", lambda: None)
    path = spool_path(tmp_path, KEY)
    grow(path, BLOB, 0.002)
    assert run(read_all(path)) == BLOB


def test_a_clients_reader_marks_the_spool_file_until_it_closes_it(tmp_path):
    path = tmp_path / "spool"
    path.write_bytes(BLOB)
    assert not clients_reading(path)
    with open(path, "rb") as first, open(path, "rb") as second:
        hold_as_reader(first.fileno())
        hold_as_reader(second.fileno())
        assert clients_reading(path)
        first.close()
        assert clients_reading(path), "the second still reads"
    assert not clients_reading(path)
    assert not clients_reading(tmp_path / "removed")


def test_the_caches_store_waits_for_the_clients_readers_for_a_bounded_time(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30)
        spool = await spooling(table, BLOB)
        with open(spool.path, "rb") as reader:
            hold_as_reader(reader.fileno())
            await clients_done(spool, wait=0.3)  # returns, though a reader still holds it
            asyncio.get_running_loop().call_later(0.2, reader.close)
            await clients_done(spool, wait=60)  # returns once the reader is done, not after 60 s
            assert reader.closed
        table.close()

    run(scenario())


def test_blob_heads_are_answered_from_a_spool_a_concurrent_head_or_a_recent_one(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30)
        heads = HeadFlights(table, known_for=0.2)
        other = ("docker.io", "library/big", "sha256:" + "1" * 64)
        assert await heads.answer(other) == (None, True), "the first HEAD goes upstream for the others"
        waiting = [asyncio.create_task(heads.answer(other)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waiting), "concurrent HEADs wait for its answer"
        heads.answered(other, 200, {"Content-Length": "7", "Docker-Content-Digest": other[2], "Content-Type": "x/y"})
        head = BlobHead(other[2], 7, "x/y")
        assert [await w for w in waiting] == [(head, False)] * 3
        assert await heads.answer(other) == (head, False), "and HEADs right after it"
        await until(lambda: len(heads) == 0)
        assert await heads.answer(other) == (None, True), "then the upstream is asked again"
        heads.answered(other, 404, {})
        assert len(heads) == 0, "a 404 is the upstream's to say, every time"

        spool, _ = table.claim(KEY)
        answer = asyncio.create_task(heads.answer(KEY))
        await table.start(spool, len(BLOB), "application/octet-stream")
        assert await answer == (BlobHead(DIGEST, len(BLOB), "application/octet-stream"), False)
        assert BlobHead(DIGEST, len(BLOB), "x").headers()["Content-Length"] == str(len(BLOB))
        table.fail(spool, "test over")

    run(scenario())


def test_a_blob_head_answer_is_kept_only_when_it_names_the_digest_and_a_size():
    digest = "sha256:" + "2" * 64
    assert blob_head(digest, 200, {"Content-Length": "5", "Docker-Content-Digest": digest}).content_type == "application/octet-stream"
    assert blob_head(digest, 200, {"Content-Length": "5", "Docker-Content-Digest": "sha256:" + "3" * 64}) is None
    assert blob_head(digest, 200, {"Docker-Content-Digest": digest}) is None
    assert blob_head(digest, 307, {"Content-Length": "5", "Docker-Content-Digest": digest}) is None
