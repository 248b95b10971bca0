"""The few requests regcache makes to upstreams itself (a tag's HEAD, a probe of a down
upstream), with aiohttp, each bounded as a whole by REGCACHE_UPSTREAM_TIMEOUT: name lookup,
connect, TLS and the answer's head. Neither has a body to wait for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp

from .upstream_state import failure_reason


class NoAnswer(Exception):
    """The upstream gave no HTTP answer in time; `reason` says why (timeout, refused, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamClient:
    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout  # seconds; the addon sets REGCACHE_UPSTREAM_TIMEOUT's value
        self._session: aiohttp.ClientSession | None = None

    async def head(self, url: str, headers: Mapping[str, str]) -> tuple[int, Mapping[str, str]]:
        """Status and headers of `HEAD url`; redirects are answers too, not followed."""
        return await self._ask("HEAD", url, headers)

    async def ping(self, base_url: str) -> None:
        """Returns once `GET base_url/v2/` gets any HTTP answer; raises NoAnswer otherwise."""
        await self._ask("GET", base_url + "/v2/", {})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _ask(self, method: str, url: str, headers: Mapping[str, str]) -> tuple[int, Mapping[str, str]]:
        if self._session is None:
            # No *_proxy variables (trust_env=False), like mitmproxy's own upstream connections.
            self._session = aiohttp.ClientSession(trust_env=False, auto_decompress=False)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._session.request(method, url, headers=headers, allow_redirects=False) as response:
                    return response.status, response.headers
        except TimeoutError:
            raise NoAnswer("timeout") from None
        except aiohttp.ClientConnectorError as e:
            raise NoAnswer(failure_reason(e.os_error)) from None
        except (aiohttp.ClientError, OSError) as e:
            raise NoAnswer(failure_reason(e)) from None
