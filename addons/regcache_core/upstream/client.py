"""The requests regcache makes to upstreams itself, with aiohttp: a tag's HEAD, a probe of a
down upstream, a registry's `GET /v2/` challenge, a token fetch (and, on a client of their
own, spools' downloads: spool_download.py). One pool of connections for all of them; each request is bounded as a whole (name lookup, connect, TLS, the answer) by its
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
from urllib.parse import urljoin, urlsplit

import aiohttp

from .state import failure_reason

CONNECT_TIMEOUT = 5.0  # seconds for a name lookup, connect and TLS handshake
MAX_REDIRECTS = 3
POOL_SIZE = 20  # connections at once, to all upstreams; each request is short (spool downloads have a pool of their own)
REDIRECTS = (301, 302, 303, 307, 308)


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
        self.timeout = timeout  # seconds for head() and ping(); the addon sets REGCACHE_UPSTREAM_TIMEOUT's value
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
        async with bounded(timeout):
            for _ in range(MAX_REDIRECTS + 1):
                status, challenges, location, body = await self._get_once(url, headers, max_body)
                if location is None:
                    return status, challenges, body
                url = followable(url, location)
            raise NoAnswer(f"more than {MAX_REDIRECTS} redirects", answered=True)

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
            if response.status in REDIRECTS and "Location" in response.headers:
                return response.status, challenges, response.headers["Location"], b""
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


def followable(url: str, location: str) -> str:
    """Where a redirect from `url` to `location` leads, if it may be followed with the request's
    headers; raises RedirectRefused otherwise."""
    target = urljoin(url, location)
    source, parts = urlsplit(url), urlsplit(target)
    if (parts.hostname or "") != (source.hostname or "") or parts.scheme not in ("https", source.scheme):
        raise RedirectRefused(f"redirected to {parts.scheme}://{parts.hostname}, another host or scheme")
    return target


def describe(error: BaseException | None) -> str:
    """An error for messages, on one line and cut short: some carry whatever the server sent."""
    text = " ".join(f"{type(error).__name__}: {getattr(error, 'message', error)}".split())
    return text if len(text) <= 120 else text[:120] + "..."
