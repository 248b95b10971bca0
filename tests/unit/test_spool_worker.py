"""The download worker (spool/worker.py) as the proxy drives it (spool/download.py,
spool/worker_link.py): a real worker process, a real spool table and files, an HTTP upstream on
loopback served by this test."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
from pathlib import Path

import pytest
from aiohttp import web

from regcache_core.config import Registry
from regcache_core.spool.download import SpoolDownloads
from regcache_core.spool.table import HOLD_BACK, SpoolBroken, SpoolTable
from tests.unit.test_spool import BLOB, DIGEST, read_all, until

REPOSITORY = "library/big"
SECRET = "Bearer worker-test-secret"


class Answers:
    """UpstreamAnswers as the downloads use it: our Authorization header, and what was reported."""

    class state:
        @staticmethod
        def reason_down(_name):
            return None

    def __init__(self) -> None:
        self.reported: list[tuple] = []

    async def authorization(self, registry, repository):
        return SECRET

    def answered(self, registry, repository, status, headers):
        self.reported.append(("answered", status))

    def answered_elsewhere(self, registry, status):
        self.reported.append(("elsewhere", status))

    def failed(self, registry, down):
        self.reported.append(("failed", down))


class Upstream:
    """Serves the blob: `body` as its bytes, the first `pause_after` of them, then waits for
    `go`; the Authorization headers it got in `authorizations`."""

    def __init__(self, body: bytes = BLOB, pause_after: int | None = None, trickle: bool = False) -> None:
        self.body, self.pause_after, self.trickle = body, pause_after, trickle
        self.go = asyncio.Event()
        self.authorizations: list[str | None] = []
        self.sent = 0

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append(request.headers.get("Authorization"))
        response = web.StreamResponse(headers={"Content-Length": str(len(self.body)),
                                               "Content-Type": "application/octet-stream"})
        await response.prepare(request)
        if self.trickle:  # 4 KiB every 50 ms, until `go`
            while not self.go.is_set():
                await response.write(self.body[self.sent:self.sent + 4096])
                self.sent += 4096
                await asyncio.sleep(0.05)
            return response
        split = len(self.body) if self.pause_after is None else self.pause_after
        await response.write(self.body[:split])
        if split < len(self.body):
            await self.go.wait()
            await response.write(self.body[split:])
        return response


async def serving(upstream: Upstream) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/v2/{repository:.+}/blobs/{digest}", upstream.blob)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def scenario(tmp_path: Path, upstream: Upstream, body):
    """Runs `body(downloads, registry, answers)` against `upstream`, then stops everything."""
    async def main():
        runner, url = await serving(upstream)
        table = SpoolTable(tmp_path / "spools", max_disk=1 << 30, linger=60)
        answers = Answers()
        downloads = SpoolDownloads(table, answers, lambda *_: None, timeout=10)
        try:
            await asyncio.wait_for(body(downloads, Registry("DOCKERHUB", "docker.io", url, None), answers), 60)
        finally:
            upstream.go.set()
            await downloads.close()
            await runner.cleanup()

    asyncio.run(main())


def worker_pid(downloads: SpoolDownloads) -> int:
    return downloads.worker.worker.process.pid


def test_a_download_goes_through_the_worker_which_gets_credentials_only_in_its_messages(tmp_path):
    upstream = Upstream()

    async def body(downloads, registry, answers):
        spool = await downloads.follow(registry, REPOSITORY, DIGEST)
        assert spool is not None
        await spool.task
        assert spool.state.value == "complete" and await read_all(spool.path) == BLOB
        pid = worker_pid(downloads)
        assert pid != os.getpid()
        for place in ("environ", "cmdline"):
            assert SECRET.split()[1].encode() not in Path(f"/proc/{pid}/{place}").read_bytes(), place
        assert upstream.authorizations == [SECRET]
        assert answers.reported == [("answered", 200)]

    scenario(tmp_path, upstream, body)


def test_the_worker_killed_mid_download_cuts_every_reader_and_the_next_download_starts_a_new_one(tmp_path, caplog):
    upstream = Upstream(pause_after=len(BLOB) // 2)

    async def body(downloads, registry, answers):
        spool = await downloads.follow(registry, REPOSITORY, DIGEST)
        sent: list[int] = []
        readers = [asyncio.create_task(read_all(spool.path, sent=sent)) for _ in range(3)]
        await until(lambda: sent and max(sent) >= len(BLOB) // 2)
        first = worker_pid(downloads)
        os.kill(first, signal.SIGKILL)
        for reader in readers:
            with pytest.raises(SpoolBroken, match="download failed"):
                await reader
        await spool.task
        assert spool.state.value == "gone" and not spool.path.exists()
        assert any("download worker" in r.message and "exited" in r.message for r in caplog.records)

        upstream.pause_after = None
        again = await downloads.follow(registry, REPOSITORY, DIGEST)
        assert again is not spool
        await again.task
        assert again.state.value == "complete" and await read_all(again.path) == BLOB
        assert worker_pid(downloads) != first

    with caplog.at_level(logging.WARNING):
        scenario(tmp_path, upstream, body)


def test_bytes_that_hash_wrong_fail_the_spool_and_its_readers_never_get_the_last_ones(tmp_path):
    other = bytes(len(BLOB))
    assert hashlib.sha256(other).hexdigest() != DIGEST.split(":")[1]
    upstream = Upstream(other)

    async def body(downloads, registry, answers):
        spool = await downloads.follow(registry, REPOSITORY, DIGEST)
        sent: list[int] = []
        reader = asyncio.create_task(read_all(spool.path, sent=sent))
        await spool.task
        with pytest.raises(SpoolBroken):
            await reader
        assert max(sent, default=0) <= len(BLOB) - HOLD_BACK
        assert spool.state.value == "gone" and not spool.path.exists()
        assert await downloads.follow(registry, REPOSITORY, DIGEST) is not spool, "the next GET downloads afresh"

    scenario(tmp_path, upstream, body)


def test_the_worker_ends_with_its_link(tmp_path):
    async def body(downloads, registry, answers):
        spool = await downloads.follow(registry, REPOSITORY, DIGEST)
        await spool.task
        process = downloads.worker.worker.process
        await downloads.worker.close()
        assert process.returncode is not None, "close returns once the worker has exited"

    scenario(tmp_path, Upstream(), body)


def test_a_trickling_body_reaches_the_spool_file_before_a_mib_of_it_came(tmp_path):
    """The worker writes what arrives a MiB at a time, but never holds a slow body's bytes back
    long: readers see them (a reader cuts a spool that does not grow)."""
    upstream = Upstream(trickle=True)

    async def body(downloads, registry, answers):
        spool = await downloads.follow(registry, REPOSITORY, DIGEST)
        await until(lambda: spool.path.stat().st_size > 0, timeout=30)
        assert upstream.sent < 1 << 20
        assert BLOB.startswith(spool.path.read_bytes())

    scenario(tmp_path, upstream, body)
