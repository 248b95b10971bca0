"""A cache asked to store a cold blob that its clients got from the proxy's download.

A client's GET of a blob its cache does not hold follows the proxy's download of it (table.py,
mitm/cold_blobs.py) and never reaches registry:2, which must still end up holding the blob, so
that the next pull is warm. So the proxy asks it, once per download: a GET of the blob. registry:2
2.8 in proxy mode answers it with two fetches from its upstream (the egress listener, where each
gets a 307 to the same spool: no upstream request), one that it stores, one that it streams to
the asker. The proxy reads none of that stream: it reads the answer's head, then leaves the
connection open, unread (registry:2's streaming fetch soon waits on it), until the blob is in the
cache's storage, and closes it. So the cache reads the spool about once, and its fetches belong to
a request that lasts until they are done (newer registry:2 versions end them with the request).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

FILL_TIME = 60.0  # seconds for the cache's answer and commit, besides reading the blob from the spool
FILL_RATE = 1 << 20  # bytes per second the cache reads the blob at, at least: the data plane cuts slower readers
STORED_POLL = 0.25  # seconds between looks at the cache's storage


async def ask_cache_to_store(cache: str, stored: Callable[[], Awaitable[bool]], repository: str, digest: str,
                             size: int) -> bool:
    """Ask the cache at base URL `cache` (plain http, as regcache runs them) to fetch and store
    the blob; whether it did (`stored()` says when its storage holds it), within a time that
    grows with `size`."""
    parts = urlsplit(cache)
    request = f"GET /v2/{repository}/blobs/{digest} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
    writer = None
    try:
        async with asyncio.timeout(FILL_TIME + size / FILL_RATE):
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            writer.write(request.encode())
            await writer.drain()
            status_line = (await reader.readuntil(b"\r\n")).decode("latin-1").strip()
            if status_line.split(" ")[1:2] != ["200"]:
                logger.warning("the cache %s was asked to store %s and answered %s", cache, digest[:19], status_line)
                return False
            while not await stored():
                await asyncio.sleep(STORED_POLL)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as e:
        logger.warning("the cache %s was asked to store %s and did not: %s", cache, digest[:19],
                       "timeout" if isinstance(e, TimeoutError) else e)
        return False
    finally:
        if writer is not None:
            writer.close()
    return True
