"""The requests regcache makes to upstreams itself, with aiohttp: a tag's HEAD, a probe of a
down upstream, a registry's `GET /v2/` challenge, a token fetch (and, on a client of their
own, spools' downloads, in the download worker: spool/worker.py). One pool of connections for all of them; each request is bounded as a whole (name lookup, connect, TLS, the answer) by its
timeout, its connect by CONNECT_TIMEOUT, and a GET's body by a size cap.

Redirects carry credentials only where they were meant to go: a GET follows a redirect to the
same host name (any port, as Go's client keeps Authorization) over the same scheme or from http
to https, never to another host and never from https to http. Anything else is refused
(RedirectRefused), so a token server cannot send regcache's Basic credentials elsewhere. A HEAD
follows none: its redirect is an answer too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from urllib.parse import urlsplit

import aiohttp

from .redirects import TooManyRedirects, follow_redirects, redirect_location
from .state import failure_reason

CONNECT_TIMEOUT = 5.0  # seconds for a name lookup, connect and TLS handshake
POOL_SIZE = 20  # connections at once, to all upstreams; each request is short (spool downloads have a pool of their own)


class NoAnswer(Exception):
    """The upstream gave no usable HTTP answer in time; `reason` says why (timeout, refused, ...).
    `answered`: something answered, but not in HTTP or not usably (the upstream is reachable)."""

    def __init__(self, reason: str, answered: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answered = answered


class RedirectRefused(NoAnswer):
    """A redirect that would take the request (and its credentials) to another host or to http."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, answered=True)


class UpstreamClient:
    def __init__(self, timeout: float = 5.0, connect_timeout: float = CONNECT_TIMEOUT, pool_size: int = POOL_SIZE) -> None:
        self.timeout = timeout  # seconds for head() and ping(); its owner (mitm/services.py) sets REGCACHE_UPSTREAM_TIMEOUT's value
        self.connect_timeout = connect_timeout
        self.pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    async def head(self, url: str, headers: Mapping[str, str]) -> tuple[int, Mapping[str, str]]:
        """Status and headers of `HEAD url`; redirects are answers too, not followed."""
        async with bounded(self.timeout):
            async with self.session().head(url, headers=headers, allow_redirects=False) as response:
                return response.status, response.headers

    async def ping(self, base_url: str) -> None:
        """Returns once `GET base_url/v2/` gets any HTTP answer; raises NoAnswer otherwise."""
        async with bounded(self.timeout):
            async with self.session().get(base_url + "/v2/", allow_redirects=False):
                return

    async def get(self, url: str, headers: Mapping[str, str], timeout: float,
                  max_body: int) -> tuple[int, list[str], bytes]:
        """`GET url`: status, WWW-Authenticate values, body. Raises NoAnswer for no answer in
        `timeout` seconds, a body over `max_body` bytes, or a redirect it may not follow."""
        async def fetch(url: str, redirected_from: str | None) -> tuple[tuple[int, list[str], bytes], str | None]:
            if redirected_from is not None:
                check_followable(redirected_from, url)
            status, challenges, location, body = await self._get_once(url, headers, max_body)
            return (status, challenges, body), location

        async with bounded(timeout):
            try:
                return await follow_redirects(url, fetch)
            except TooManyRedirects as e:
                raise NoAnswer(str(e), answered=True) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No *_proxy variables (trust_env=False), like mitmproxy's own upstream connections.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.pool_size),
                timeout=aiohttp.ClientTimeout(sock_connect=self.connect_timeout),
                trust_env=False, auto_decompress=False,
            )
        return self._session

    async def _get_once(self, url: str, headers: Mapping[str, str],
                        max_body: int) -> tuple[int, list[str], str | None, bytes]:
        async with self.session().get(url, headers=headers, allow_redirects=False) as response:
            challenges = response.headers.getall("WWW-Authenticate", [])
            if (location := redirect_location(response.status, response.headers)) is not None:
                return response.status, challenges, location, b""
            body = await response.content.read(max_body + 1)
            if len(body) > max_body:
                raise NoAnswer(f"an answer over {max_body} bytes", answered=True)
            return response.status, challenges, None, body


@contextlib.asynccontextmanager
async def bounded(timeout: float):
    """The whole exchange within `timeout` seconds; every way it can fail becomes NoAnswer."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise NoAnswer("timeout") from None
    except aiohttp.ClientConnectorError as e:
        raise NoAnswer(failure_reason(e.os_error)) from None
    except (aiohttp.ClientError, ValueError) as e:  # it answered, but not in HTTP
        raise NoAnswer(describe(e), answered=True) from None
    except OSError as e:
        raise NoAnswer(failure_reason(e)) from None


def check_followable(url: str, target: str) -> None:
    """Raises RedirectRefused unless a redirect from `url` to `target` may be followed with the
    request's headers."""
    source, parts = urlsplit(url), urlsplit(target)
    if (parts.hostname or "") != (source.hostname or "") or parts.scheme not in ("https", source.scheme):
        raise RedirectRefused(f"redirected to {parts.scheme}://{parts.hostname}, another host or scheme")


def describe(error: BaseException | None) -> str:
    """An error for messages, on one line and cut short: some carry whatever the server sent."""
    text = " ".join(f"{type(error).__name__}: {getattr(error, 'message', error)}".split())
    return text if len(text) <= 120 else text[:120] + "..."
