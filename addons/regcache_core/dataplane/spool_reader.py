"""The data plane's spool route: `GET`/`HEAD /_regcache/spool?<signed spool grant>`.

A cache's fetch of a cold blob is sent here (see spool.py), and gets the blob from the spool
file the proxy's download writes, while it grows: at once, not after the whole download. The
answer carries registry:2's blob headers and the grant's size as Content-Length; when the
spool can never be whole (the download failed, the proxy died, the bytes hash wrong) the
connection is cut, so no short body passes for a complete one.

These are a cache's fetches, not a client's pulls: they leave no pull record (the client's own
request, through the proxy, has one), only a log line.
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from ..routing import Refusal
from ..spool.table import SPOOL_DIR, SpoolBroken, describe, open_spool, read_spool, spool_path
from .exchange import CONFIG, EXCHANGE, SIGNER, denied, refused

logger = logging.getLogger(__name__)

WRITE_TIMEOUT = 60.0  # seconds a cache may take to read one chunk (up to 1 MiB) before it is cut


async def serve_spool(request: web.Request) -> web.StreamResponse:
    request[EXCHANGE].recorded = False
    grant = request.app[SIGNER].verify(request.rel_url.raw_query_string, "spool")
    if grant is None:
        return denied()
    key = (grant.registry, grant.repository, grant.digest)
    try:
        fd = await open_spool(spool_path(request.app[CONFIG].data_dir / SPOOL_DIR, key))
    except FileNotFoundError:
        return refused(Refusal(404, "BLOB_UNKNOWN", "this spool is gone; fetch the blob again"))
    try:
        return await send_spool(request, fd, grant.size, grant.digest, describe(key))
    finally:
        os.close(fd)


async def send_spool(request: web.Request, fd: int, size: int, digest: str, what: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Docker-Distribution-API-Version": "registry/2.0",
    })
    response.content_length = size
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    sent = 0
    try:
        async for chunk in read_spool(fd, size, digest):
            async with asyncio.timeout(WRITE_TIMEOUT):
                await response.write(chunk)
            sent += len(chunk)
    except (SpoolBroken, TimeoutError, ConnectionError) as e:
        reason = f"the client read nothing for {WRITE_TIMEOUT:.0f}s" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
        # A warning when the blob can never be whole (the data plane logs warnings only): it
        # says why the clients behind that cache failed.
        level = logging.WARNING if isinstance(e, SpoolBroken) else logging.INFO
        logger.log(level, "spool of %s to %s cut after %d of %d bytes: %s", what, request.remote, sent, size, reason)
        if request.transport is not None:
            request.transport.abort()  # the connection ends short of Content-Length
        return response
    await response.write_eof()
    logger.info("spool of %s to %s: sent %d bytes, whole", what, request.remote, sent)
    return response
