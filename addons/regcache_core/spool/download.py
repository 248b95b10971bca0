"""The proxy's own download of a cold blob into its spool (spool.py).

The first egress GET of a blob starts it; no request owns it, so none leaving can cut it. It
asks the upstream with our credentials (upstream_auth.py), follows redirects (Docker Hub sends
blobs to its CDN) to where redirects may lead (redirects.py: checked, connected to at the address
checked, no credentials), and writes the 200 body to the spool. It goes on to the end even when
every GET that followed it has gone: the blob is cold and was asked for, the next pull of it
(a client's retry after Ctrl-C, the next node of a rollout, registry:2's own store) gets it from
the spool while it lingers, and Docker Hub meters what we fetch. It is bounded: the blob must fit
REGCACHE_SPOOL_MAX_DISK, the answer's headers come within REGCACHE_UPSTREAM_TIMEOUT (token,
redirects and all), and a body that stops for BODY_STALL seconds fails the spool.

Accounting stays exact: a download that gets the blob's bytes makes one client request for it a
miss (hit_tracking.py) and counts in the upstream metrics like any fetch through the proxy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from ..config import Registry, is_local
from ..upstream.redirects import TooManyRedirects, follow_redirects, may_lead_to, redirect_location, resolve_destination
from .table import READ_CHUNK, Key, Spool, SpoolTable, describe
from ..upstream.auth import UpstreamAuthError
from ..upstream.client import NoAnswer, UpstreamClient, bounded
from ..upstream.client import describe as describe_error
from ..upstream.signals import UpstreamAnswers

logger = logging.getLogger(__name__)

BODY_STALL = 30.0  # seconds without a byte of the body, then the download fails (readers wait longer)
WRITES_AHEAD = 4  # chunks (up to READ_CHUNK each) read but not yet written, at most
POOL_SIZE = 64  # downloads at once, to all upstreams (a pool of their own: they are long)


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
        self.client = UpstreamClient(pool_size=POOL_SIZE)
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

    def close(self) -> None:
        """Every download stops and every spool goes. Sync: mitmproxy calls `done` from sync code too."""
        self.table.close()
        with contextlib.suppress(RuntimeError):  # no running loop: no session was opened on one
            self.closing = asyncio.get_running_loop().create_task(self.client.close())  # kept: tasks are weakly held

    async def _download(self, registry: Registry, spool: Spool) -> None:
        _, repository, digest = spool.key
        try:
            response, _ = await self._answer(registry, repository, digest, "GET")
        except (UpstreamAuthError, NoAnswer, DownloadRefused) as e:
            logger.info("not spooling %s: %s; fetches go upstream", describe(spool.key), e)
            self.table.decline(spool)
            return
        except asyncio.CancelledError:
            self.table.fail(spool, "regcache stops")
            raise
        try:
            async with response:
                if response.status != 200:
                    logger.info("not spooling %s: the upstream answered %d; fetches go upstream", describe(spool.key),
                                response.status)
                    self.table.decline(spool)
                    return
                writer = await self.table.start(spool, response.content_length, response.headers.get("Content-Type"))
                if writer is None:
                    return
                self.blob_fetched(registry.name, repository, digest)
                # The next chunks are read while the last ones are written and hashed, a few at most.
                writes: collections.deque[asyncio.Future] = collections.deque()
                while chunk := await self._next_chunk(response):
                    writes.append(writer.write(chunk))
                    if len(writes) > WRITES_AHEAD:
                        await writes.popleft()
                for write in writes:
                    await write
            await self.table.finish(spool)
            logger.info("upstream fetch for %s: GET %s, %d bytes, for its spool", registry.name, describe(spool.key),
                        writer.received)
        except asyncio.CancelledError:
            self.table.fail(spool, "regcache stops")
            raise
        except Exception as e:  # the upstream, the network or the disk failed: every reader cuts
            reason = "the body stalled" if isinstance(e, TimeoutError) else describe_error(e)
            self.table.fail(spool, reason)

    async def head(self, registry: Registry, repository: str, digest: str) -> tuple[int | None, Mapping[str, str]]:
        """The upstream's answer to a HEAD of the blob, made as a download's GET is (credentials,
        redirects followed where they may lead): status and headers; None and no headers when
        there was no usable answer. A redirect's target (a CDN) names no digest: the upstream
        did, by redirecting the HEAD of that digest, so its 200 is given the header."""
        try:
            response, redirected = await self._answer(registry, repository, digest, "HEAD")
        except (UpstreamAuthError, NoAnswer, DownloadRefused) as e:
            logger.info("blob HEAD of %s: no answer from upstream (%s)", describe((registry.name, repository, digest)), e)
            return None, {}
        response.release()
        headers = CIMultiDict(response.headers)
        if redirected and response.status == 200:
            headers.setdefault("Docker-Content-Digest", digest)
        return response.status, headers

    async def _answer(self, registry: Registry, repository: str, digest: str,
                      method: str) -> tuple[aiohttp.ClientResponse, bool]:
        """The upstream's answer to `method` of the blob, its redirects followed, headers read, and
        whether it came from a redirect's target: within the upstream timeout as a whole. Raises
        NoAnswer (the upstream is marked down), UpstreamAuthError or DownloadRefused."""
        answered = False  # once the upstream answered, a redirect target failing says nothing of it
        redirected = False

        async def fetch(url: str, redirected_from: str | None) -> tuple[aiohttp.ClientResponse, str | None]:
            nonlocal answered, redirected
            redirected = redirected_from is not None
            if not redirected:
                response = await self._send(method, url, {"Authorization": authorization} if authorization else {})
                self.upstream.answered(registry, repository, response.status, response.headers)
                answered = True
            else:
                # A redirect target gets no credentials, as when the caches follow one through us.
                response = await self._send(method, url, {}, await self._checked_address(registry, url))
                self.upstream.answered_elsewhere(registry, response.status)
            if (location := redirect_location(response.status, response.headers)) is not None:
                response.release()
            return response, location

        try:
            async with bounded(self.timeout):
                authorization = await self.upstream.authorization(registry, repository)
                response = await follow_redirects(f"{registry.upstream}/v2/{repository}/blobs/{digest}", fetch)
                return response, redirected
        except TooManyRedirects as e:
            raise DownloadRefused(str(e)) from None
        except NoAnswer as e:
            self.upstream.failed(registry, None if e.answered or answered else e.reason)
            raise

    async def _send(self, method: str, url: str, headers: dict[str, str],
                    address: str | None = None) -> aiohttp.ClientResponse:
        """`method url`, connected to `address` when given (the name stays in Host and TLS's SNI)."""
        parts = urlsplit(url)
        options = {}
        if address is not None:
            headers = {**headers, "Host": parts.netloc}
            host = f"[{address}]" if ":" in address else address
            url = parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()
            if parts.scheme == "https":
                options["server_hostname"] = parts.hostname
        return await self.client.session().request(method, url, headers=headers, allow_redirects=False, **options)

    async def _checked_address(self, registry: Registry, url: str) -> str | None:
        """Where a redirect to `url` connects; DownloadRefused where it may not lead (redirects.py)."""
        host = urlsplit(url).hostname or ""
        if not may_lead_to(registry, url):
            raise DownloadRefused(f"redirected to {urlsplit(url).scheme}://{host}, where its redirects may not lead")
        destination = await resolve_destination(host)
        if not is_local(registry.upstream) and destination.internal:
            logger.warning("refused a redirect of %s's upstream to %s: it is this machine or its link", registry.name, host)
            raise DownloadRefused(f"redirected to {host}, an internal address")
        if destination.address is None:
            raise NoAnswer(f"name lookup failed for {host}", answered=True)
        return destination.address

    @staticmethod
    async def _next_chunk(response: aiohttp.ClientResponse) -> bytes:
        async with asyncio.timeout(BODY_STALL):
            return await response.content.read(READ_CHUNK)
