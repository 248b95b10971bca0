"""Single-flight spools without mitmproxy: the leader/follower table and the spool file protocol
(spool.py), on real files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

import pytest

from regcache_core.spool import SpoolBroken, SpoolTable, open_spool, read_spool, spool_path

BLOB = os.urandom(3 << 20)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
KEY = ("docker.io", "library/big", DIGEST)
CHUNK = 64 << 10


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def read_all(path, size=len(BLOB), digest=DIGEST, **options) -> bytes:
    fd = await open_spool(path)
    try:
        return b"".join([chunk async for chunk in read_spool(fd, size, digest, **options)])
    finally:
        os.close(fd)


async def spooling(table: SpoolTable, written: bytes):
    """A leader of KEY that got its 200 and passed on `written` so far: (spool, writer)."""
    _, spool = await table.claim(KEY)
    writer = await table.start(spool, len(BLOB))
    writer(written)
    return spool, writer


async def until(condition, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_the_first_fetch_leads_and_concurrent_ones_follow_its_spool_while_it_grows(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30, linger=0.2)
        role, spool = await table.claim(KEY)
        assert role == "leader"
        follower = asyncio.create_task(table.claim(KEY))
        await asyncio.sleep(0.05)
        assert not follower.done(), "a follower waits for the leader's answer headers"
        writer = await table.start(spool, len(BLOB))
        assert await follower == ("follower", spool)
        reader = asyncio.create_task(read_all(spool.path))
        passed = b""
        for offset in range(0, len(BLOB), CHUNK):
            passed += writer(BLOB[offset:offset + CHUNK])
            await asyncio.sleep(0.001)
        assert writer(b"") == b""
        assert passed == BLOB, "the leader's bytes pass on unchanged"
        await table.finish(spool)
        assert await reader == BLOB
        assert await table.claim(KEY) == ("follower", spool), "a completed spool serves followers while it lingers"
        await until(lambda: len(table) == 0)
        assert not spool.path.exists(), "a completed spool is removed after it lingered"
        assert (await table.claim(KEY))[0] == "leader"

    run(scenario())


@pytest.mark.parametrize("outcome", ["declined", "failed before headers"])
def test_followers_go_upstream_themselves_when_the_leader_has_no_body(tmp_path, outcome):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30)
        _, spool = await table.claim(KEY)
        followers = [asyncio.create_task(table.claim(KEY)) for _ in range(3)]
        await asyncio.sleep(0.01)
        if outcome == "declined":  # a 404, say
            table.decline(spool)
        else:
            table.fail(spool, "connection refused")
        assert [await f for f in followers] == [("upstream", None)] * 3
        assert len(table) == 0 and not spool.path.exists()

    run(scenario())


def test_a_leader_failing_midway_cuts_its_readers_and_leaves_no_file(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30)
        spool, _ = await spooling(table, BLOB[:CHUNK * 3])
        reader = asyncio.create_task(read_all(spool.path))
        await asyncio.sleep(0.1)
        assert not reader.done(), "a reader waits for a spool that is still growing"
        table.fail(spool, "upstream reset the connection")
        with pytest.raises(SpoolBroken, match="leader failed"):
            await reader
        await until(lambda: len(table) == 0)
        assert list((tmp_path / "spools").iterdir()) == []
        assert (await table.claim(KEY))[0] == "leader", "the next fetch leads afresh"

    run(scenario())


def test_a_leader_ending_short_fails_its_spool(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30)
        spool, _ = await spooling(table, BLOB[:CHUNK])
        await table.finish(spool)
        await until(lambda: len(table) == 0)
        assert not spool.path.exists()

    run(scenario())


def test_over_the_disk_bound_a_leader_does_not_spool_and_followers_go_upstream(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=len(BLOB) + 10)
        _, first = await table.claim(KEY)
        assert await table.start(first, len(BLOB)) is not None
        other = ("docker.io", "library/big", "sha256:" + "0" * 64)
        _, second = await table.claim(other)
        follower = asyncio.create_task(table.claim(other))
        await asyncio.sleep(0.01)
        assert await table.start(second, 11) is None, "both would be over the bound"
        assert await follower == ("upstream", None)
        assert await table.start((await table.claim(other))[1], None) is None, "no Content-Length, no spool"

    run(scenario())


def test_a_follower_waits_a_bounded_time_for_the_leaders_headers(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30, follow_wait=0.1)
        await table.claim(KEY)
        assert await table.claim(KEY) == ("upstream", None)

    run(scenario())


def test_a_redirected_leaders_follow_up_leads_and_an_unfollowed_redirect_releases_followers(tmp_path):
    async def scenario():
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30, handover_wait=0.1)
        _, spool = await table.claim(KEY)
        follower = asyncio.create_task(table.claim(KEY))
        table.redirected(spool)  # the upstream sent the leader to a CDN
        assert table.take_over(KEY) is spool
        assert table.take_over(KEY) is None, "only one follow-up takes the lead"
        await table.start(spool, len(BLOB))
        assert await follower == ("follower", spool)
        table.fail(spool, "test over")
        await until(lambda: len(table) == 0)

        _, spool = await table.claim(KEY)
        follower = asyncio.create_task(table.claim(KEY))
        table.redirected(spool)
        assert await follower == ("upstream", None), "nobody followed the redirect in time"

    run(scenario())


def test_spools_of_an_earlier_run_are_removed_at_start(tmp_path):
    (tmp_path / "spools").mkdir()
    (tmp_path / "spools" / "leftover").write_bytes(b"x" * 100)
    SpoolTable(tmp_path / "spools", max_disk=1 << 30)
    assert list((tmp_path / "spools").iterdir()) == []


def grow(path, data: bytes, pause: float, unlink_at: int | None = None) -> threading.Thread:
    """Another process's writer, as the proxy is to a data-plane worker: appends in chunks."""
    def write() -> None:
        with open(path, "wb", buffering=0) as f:
            for offset in range(0, len(data), CHUNK):
                if unlink_at is not None and offset >= unlink_at:
                    path.unlink()
                    return
                f.write(data[offset:offset + CHUNK])
                time.sleep(pause)

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
    with pytest.raises(SpoolBroken, match="leader failed"):
        run(read_all(path))


def test_a_reader_holds_the_last_bytes_back_when_they_hash_wrong(tmp_path):
    path = spool_path(tmp_path, KEY)
    wrong = BLOB[:-1] + bytes([BLOB[-1] ^ 1])
    grow(path, wrong, 0)
    yielded = []

    async def scenario():
        fd = await open_spool(path)
        try:
            async for chunk in read_spool(fd, len(BLOB), DIGEST):
                yielded.append(chunk)
        finally:
            os.close(fd)

    with pytest.raises(SpoolBroken, match="hash"):
        run(scenario())
    assert sum(map(len, yielded)) < len(BLOB), "the last chunk was not passed on"


def test_a_reader_cuts_a_spool_that_stops_growing(tmp_path):
    path = spool_path(tmp_path, KEY)
    path.write_bytes(BLOB[:CHUNK])  # a writer that died: the file stays, and never grows
    with pytest.raises(SpoolBroken, match="no growth"):
        run(read_all(path, stall_timeout=0.3))
