"""The data plane's spool routes: a cold blob from the spool file the proxy's download writes
(see spool/table.py), while it grows: at once, not after the whole download.

- `GET`/`HEAD /_regcache/cold?<signed cold grant>`: a client's GET of a blob its cache does not
  hold, sent here by the proxy (mitm/cold_blobs.py). Clients only (REGCACHE_CLIENTS), with a
  pull record as for a warm blob: its `cache` is the grant's ("miss" for the client whose
  request brought the blob, "hit" for the others).
- `GET`/`HEAD /_regcache/spool?<signed spool grant>`: a cache's fetch of a cold blob, sent here
  from the egress listener (mitm/single_flight.py). No pull record (the client's own request
  has one), only a log line; the cache need not be among the clients.

The answer carries registry:2's blob headers and the grant's size as Content-Length, and the
bytes go by sendfile as the download writes them, the last ones only once the proxy sealed the
spool (every byte there, hashing to the digest). When the spool can never be whole (the
download failed, the proxy died, the bytes hash wrong) the connection is cut, so no short body
passes for a complete one. No Range: a spool is sent whole.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..routing import Refusal
from ..spool.table import SPOOL_DIR, SpoolProgress, describe, hold_as_reader, spool_path
from .exchange import CONFIG, EXCHANGE, SIGNER, Exchange, denied, refuse_stranger, refused
from .file_response import Plan, send

logger = logging.getLogger(__name__)


async def serve_spool(request: web.Request) -> web.StreamResponse:
    request[EXCHANGE].recorded = False
    return await _serve(request, "spool")


async def serve_cold(request: web.Request) -> web.StreamResponse:
    if (refusal := refuse_stranger(request)) is not None:
        return refusal
    return await _serve(request, "cold")


async def _serve(request: web.Request, kind: str) -> web.StreamResponse:
    exchange: Exchange = request[EXCHANGE]
    grant = request.app[SIGNER].verify(request.rel_url.raw_query_string, kind)
    if grant is None:
        return denied()
    exchange.grant = grant
    key = (grant.registry, grant.repository, grant.digest)
    try:
        file = await asyncio.to_thread(open, spool_path(request.app[CONFIG].data_dir / SPOOL_DIR, key), "rb")
    except FileNotFoundError:
        return refused(Refusal(404, "BLOB_UNKNOWN", "this spool is gone; fetch the blob again"))
    exchange.served = True
    if kind == "cold":
        hold_as_reader(file.fileno())  # the cache's store of the blob waits for the clients' transfers
    progress = SpoolProgress(file.fileno(), grant.size)
    headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": grant.digest,
               "ETag": f'"{grant.digest}"', "Docker-Distribution-API-Version": "registry/2.0",
               "Content-Length": str(grant.size)}
    try:
        response, exchange.error = await send(request, file, Plan(200, headers, 0, grant.size), exchange.count,
                                              progress.ready)
    finally:
        file.close()
    if request.method == "GET":
        # A warning when the blob can never be whole (the data plane logs warnings only): it
        # says why the pulls of that layer failed.
        level = logging.WARNING if progress.broken else logging.INFO
        outcome = f"cut after {exchange.sent} of {grant.size} bytes: {exchange.error}" if exchange.error else \
            f"sent {exchange.sent} bytes, whole"
        logger.log(level, "%s of %s to %s: %s", kind, describe(key), request.remote, outcome)
    return response
