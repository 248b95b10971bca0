"""The proxy's own download of a cold blob into its spool (table.py).

The first egress GET of a blob starts it; no request owns it, so none leaving can cut it. It
asks the upstream with our credentials (upstream/auth.py), follows redirects (Docker Hub sends
blobs to its CDN) to where redirects may lead (upstream/redirects.py: checked, connected to at
the address checked, no credentials), and writes the 200 body to the spool. It goes on to the end
even when every GET that followed it has gone: the blob is cold and was asked for, the next pull
of it (a client's retry after Ctrl-C, the next node of a rollout, registry:2's own store) gets it
from the spool while it lingers, and Docker Hub meters what we fetch. It is bounded: the blob must
fit REGCACHE_SPOOL_MAX_DISK, the answer's headers come within REGCACHE_UPSTREAM_TIMEOUT (token,
redirects and all), and a body that stops for BODY_STALL seconds (body.py) fails the spool.

The bytes never cross the proxy: the download worker (worker.py, a process of the proxy's own)
makes the exchange and writes and hashes the body; the proxy decides everything else from what
it tells (each answer's status and headers, then the bytes written and their digest), here.

Accounting stays exact: a download that gets the blob's bytes makes one client request for it a
miss (observe/hits.py) and counts in the upstream metrics like any fetch through the proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from multidict import CIMultiDict

from ..config import Registry
from ..upstream.auth import UpstreamAuthError
from ..upstream.client import NoAnswer, bounded
from ..upstream.signals import UpstreamAnswers
from .table import Key, Spool, SpoolTable, describe
from .worker_link import Exchange, WorkerLink

logger = logging.getLogger(__name__)


class DownloadRefused(Exception):
    """The upstream's answer leads where a download may not go; the GETs go upstream themselves."""


class SpoolDownloads:
    """Starts and runs the downloads of one proxy's spools."""

    def __init__(self, table: SpoolTable, upstream: UpstreamAnswers, blob_fetched: Callable[[str, str, str], None],
                 timeout: float) -> None:
        self.table = table
        self.upstream = upstream  # credentials, and where what the upstream answered is reported
        self.blob_fetched = blob_fetched  # (registry, repository, digest): InFlight.upstream_blob_fetch
        self.timeout = timeout
        self.worker = WorkerLink()
        self.worker.start_soon()
        self.running: set[asyncio.Task] = set()  # downloads not finished: clients may be reading their spools

    async def follow(self, registry: Registry, repository: str, digest: str) -> Spool | None:
        """The spool an egress GET of this blob is served from, its download started by the first
        GET; None: the GET goes upstream itself (its upstream is down, or the blob is not spooled)."""
        if self.upstream.state.reason_down(registry.name):
            return None  # UpstreamDeadlines answers the GET 503 at once
        spool = self.claim(registry, (registry.name, repository, digest))
        return spool if await self.table.follow(spool) else None

    def claim(self, registry: Registry, key: Key) -> Spool:
        """The spool of `key`, its download started when it is new."""
        spool, new = self.table.claim(key)
        if new:
            spool.task = asyncio.get_running_loop().create_task(self._download(registry, spool))
            self.running.add(spool.task)
            spool.task.add_done_callback(self.running.discard)
        return spool

    async def close(self) -> None:
        """Every download stops and every spool goes; returns once the worker has exited."""
        self.table.close()
        await self.worker.close()

    async def _download(self, registry: Registry, spool: Spool) -> None:
        _, repository, digest = spool.key
        try:
            exchange, status, headers, _ = await self._answer(registry, repository, digest, "GET")
        except (UpstreamAuthError, NoAnswer, DownloadRefused) as e:
            logger.info("not spooling %s: %s; fetches go upstream", describe(spool.key), e)
            self.table.decline(spool)
            return
        except asyncio.CancelledError:
            self.table.fail(spool, "regcache stops")
            raise
        try:
            with exchange:
                if status != 200:
                    logger.info("not spooling %s: the upstream answered %d; fetches go upstream", describe(spool.key),
                                status)
                    self.table.decline(spool)
                    return
                size = headers.get("Content-Length")
                if not await self.table.start(spool, int(size) if size and size.isdigit() else None,
                                              headers.get("Content-Type")):
                    return
                self.blob_fetched(registry.name, repository, digest)
                exchange.send("write", path=str(spool.path), size=spool.size, algorithm=digest.partition(":")[0])
                end = await exchange.event()  # the worker bounds the body's stalls; its death ends it too
            if end["event"] != "done":
                self.table.fail(spool, end["reason"])
                return
            await self.table.finish(spool, end["received"], end["digest"])
            logger.info("upstream fetch for %s: GET %s, %d bytes, for its spool", registry.name, describe(spool.key),
                        end["received"])
        except asyncio.CancelledError:
            self.table.fail(spool, "regcache stops")
            raise

    async def head(self, registry: Registry, repository: str, digest: str) -> tuple[int | None, Mapping[str, str]]:
        """The upstream's answer to a HEAD of the blob, made as a download's GET is (credentials,
        redirects followed where they may lead): status and headers; None and no headers when
        there was no usable answer. A redirect's target (a CDN) names no digest: the upstream
        did, by redirecting the HEAD of that digest, so its 200 is given the header."""
        try:
            exchange, status, headers, redirected = await self._answer(registry, repository, digest, "HEAD")
        except (UpstreamAuthError, NoAnswer, DownloadRefused) as e:
            logger.info("blob HEAD of %s: no answer from upstream (%s)", describe((registry.name, repository, digest)), e)
            return None, {}
        exchange.close()
        if redirected and status == 200:
            headers.setdefault("Docker-Content-Digest", digest)
        return status, headers

    async def _answer(self, registry: Registry, repository: str, digest: str,
                      method: str) -> tuple[Exchange, int, CIMultiDict, bool]:
        """The worker's exchange of `method` of the blob, its redirects followed, and the final
        answer's status, its headers and whether it came from a redirect's target: within the upstream timeout as a whole, each answer on the
        way reported as the upstream's. Raises NoAnswer (the upstream is marked down),
        UpstreamAuthError or DownloadRefused."""
        answered = False  # once the upstream answered, a redirect target failing says nothing of it
        exchange: Exchange | None = None
        try:
            async with bounded(self.timeout):
                authorization = await self.upstream.authorization(registry, repository)
                exchange = await self.worker.exchange(
                    method=method, url=f"{registry.upstream}/v2/{repository}/blobs/{digest}", authorization=authorization,
                    registry=registry.name, upstream=registry.upstream, timeout=self.timeout)
                while True:
                    event = await exchange.event()
                    if event["event"] == "answer":
                        if event["redirected"]:
                            self.upstream.answered_elsewhere(registry, event["status"])
                        else:
                            answered = True
                            self.upstream.answered(registry, repository, event["status"], CIMultiDict(event["headers"]))
                        if event["final"]:
                            return exchange, event["status"], CIMultiDict(event["headers"]), event["redirected"]
                    elif event["event"] == "refused":
                        if event["warning"]:
                            logger.warning("%s", event["warning"])
                        raise DownloadRefused(event["reason"])
                    elif event["event"] == "no_answer":
                        raise NoAnswer(event["reason"], event["answered"])
                    else:  # lost: the worker died
                        raise NoAnswer(event["reason"], answered=True)
        except BaseException as e:
            if isinstance(e, NoAnswer):
                self.upstream.failed(registry, None if e.answered or answered else e.reason)
            if exchange is not None:
                exchange.close()
            raise

