"""A cache asked to store a cold blob that its clients got from the proxy's download.

A client's GET of a blob its cache does not hold follows the proxy's download of it (spool.py,
mitm/cold_blobs.py) and never reaches registry:2, which must still end up holding the blob, so
that the next pull is warm. So the proxy asks it once per download: a HEAD of the blob, which
registry:2 2.8 in proxy mode answers by fetching the whole blob from its upstream (the egress
listener, where every fetch of that blob gets a 307 to the same spool: no upstream request)
and storing it. Its answer's headers come with its first bytes, but registry:2 fetches on the
request's behalf until its handler ends, so the connection stays open until then: a request
sent right after the HEAD on the same connection (`GET /v2/`, pipelined) is answered only once
registry:2 is done with the HEAD, and the exchange ends with that answer.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

FILL_TIME = 60.0  # seconds for the cache's answers besides reading the blob from the spool
FILL_RATE = 1 << 20  # bytes per second the cache reads the blob at, at least: the data plane cuts slower readers


async def ask_cache_to_store(cache: str, repository: str, digest: str, size: int) -> bool:
    """Ask the cache at base URL `cache` (plain http, as regcache runs them) to fetch and store
    the blob; whether it answered the HEAD 200 and the ping after it, within a time that
    grows with `size`."""
    parts = urlsplit(cache)
    host, port = parts.hostname or "", parts.port or 80
    request = (f"HEAD /v2/{repository}/blobs/{digest} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n"
               f"GET /v2/ HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n").encode()
    writer = None
    try:
        async with asyncio.timeout(FILL_TIME + size / FILL_RATE):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.read()  # the ping's answer, then the end: registry:2 is done with the HEAD
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as e:
        logger.warning("the cache %s was asked to store %s and did not answer: %s", cache, digest[:19],
                       type(e).__name__ if isinstance(e, TimeoutError) else e)
        return False
    finally:
        if writer is not None:
            writer.close()
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        logger.warning("the cache %s was asked to store %s and answered %s", cache, digest[:19],
                       head.split(b"\r\n", 1)[0].decode("latin-1"))
        return False
    return True
