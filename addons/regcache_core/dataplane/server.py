"""The data plane's HTTP server: sends what a grant names, nothing else.

GET and HEAD of `/_regcache/blob?<grant>` send a warm blob from its cache's storage (see
storage.py) with registry:2's headers, to addresses in REGCACHE_CLIENTS only; of
`/_regcache/cold?<grant>` (a client's) and `/_regcache/spool?<grant>` (a cache's fetch), a cold
blob from the spool of the proxy's download of it (spool_reader.py). Every client request leaves
a pull record, handed to `records` (the worker sends them to the proxy): a blob sent is marked
as its grant says (a warm one is a cache hit), with the bytes actually sent; a refusal names
what was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from ..observe import pull_log
from ..access.clients import ClientNetworks
from ..cluster.reads import ClusterReads
from ..config import Config
from ..observe.pull_log import PullRecord
from ..objectstore.blobs import StoredBlobs
from ..objectstore.copies import COPIES_DIR, LocalCopies
from ..routing import Refusal
from .exchange import CLIENTS, CONFIG, EXCHANGE, RECORDS, SIGNER, Exchange, Handler, denied, refuse_stranger, refused
from .file_response import open_file, plan, send
from .grants import GRANT_PATHS, Grant, GrantSigner
from .object_reader import LOCAL_COPIES, STORE_DOWN, STORED_BLOBS, send_object
from .spool_reader import serve_cold, serve_spool
from .storage import warm_blob

BACKEND = pull_log.DATAPLANE_BACKEND
KEEPALIVE_TIMEOUT = 30.0  # seconds an idle connection (or one whose request head is not in yet) stays open
READS = web.AppKey("reads", ClusterReads)  # with replicas only


async def serve_blob(request: web.Request) -> web.StreamResponse:
    exchange: Exchange = request[EXCHANGE]
    if (refusal := refuse_stranger(request)) is not None:
        return refusal
    grant = request.app[SIGNER].verify(request.rel_url.raw_query_string, "blob")
    if grant is None:
        return denied()
    exchange.grant = grant
    registry = request.app[CONFIG].registry(grant.registry)
    async with reading(request, grant):
        if registry is not None and registry.object_store is not None:
            return await send_object(request, exchange, grant, registry)
        return await send_file(request, exchange, grant, registry.storage if registry else None)


def reading(request: web.Request, grant: Grant) -> contextlib.AbstractAsyncContextManager:
    """With replicas, a GET of a stored blob is registered for the cluster while it is sent, so
    that no replica's disk budget evicts the blob meanwhile (cluster/reads.py)."""
    reads = request.app.get(READS)
    if reads is None or request.method != "GET":
        return contextlib.nullcontext()
    return reads.read(grant.registry, grant.digest)


async def send_file(request: web.Request, exchange: Exchange, grant: Grant, storage: Path | None) -> web.StreamResponse:
    path = storage and await asyncio.to_thread(warm_blob, storage, grant.repository, grant.digest)
    opened = path and await asyncio.to_thread(open_file, path)
    if not opened or opened[1].st_size != grant.size:
        if opened:
            opened[0].close()
        return refused(Refusal(404, "BLOB_UNKNOWN", f"{grant.digest} is not in the cache of {grant.registry}/{grant.repository}"))
    file, status = opened
    exchange.served = True
    try:
        response, exchange.error = await send(request, file, plan(request, status.st_size, status.st_mtime, grant.digest),
                                              exchange.count)
    finally:
        file.close()
    return response


# Path -> handler of GET and HEAD.
ROUTES: dict[str, Handler] = {
    GRANT_PATHS["blob"]: serve_blob,
    GRANT_PATHS["spool"]: serve_spool,
    GRANT_PATHS["cold"]: serve_cold,
}


@web.middleware
async def recorded(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Runs the handler, answers what it refuses (and aiohttp's 404/405) in registry error JSON,
    and hands one pull record per request to RECORDS."""
    exchange = request[EXCHANGE] = Exchange(time.time())
    status = 0
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        what = f"{request.method} is not allowed: GET and HEAD only" if e.status == 405 else "not a data-plane path"
        return refused(Refusal(e.status, "UNSUPPORTED", what))
    finally:
        if exchange.recorded:
            request.app[RECORDS](record_of(request, exchange, status, time.time()))


def record_of(request: web.Request, exchange: Exchange, status: int, now: float) -> PullRecord:
    grant = exchange.grant
    return pull_log.pull_record(
        started=exchange.started, finished=now, client=request.remote or "",
        registry=grant.registry if grant else None, repository=grant.repository if grant else None,
        # Warm or cold, what the client asked for is a blob.
        kind="blob" if grant else None, reference=grant.digest if grant else None,
        method=request.method, status=status, sent=exchange.sent,
        backend=BACKEND if exchange.served else None, cache=grant.cache if exchange.served else None,
        error=exchange.error,
    )


def make_app(config: Config, signer: GrantSigner, records: Callable[[PullRecord], None],
             store_down: Callable[[str], None], reads: ClusterReads | None = None) -> web.Application:
    """`records(record)` takes each pull record, `store_down(reason)` each failure to reach the object
    store; `reads`, with replicas, registers the stored blobs sent (cluster/reads.py)."""
    app = web.Application(middlewares=[recorded], handler_args={"keepalive_timeout": KEEPALIVE_TIMEOUT})
    app[CONFIG], app[SIGNER], app[RECORDS] = config, signer, records
    if reads is not None:
        app[READS] = reads
    app[CLIENTS] = ClientNetworks(config.client_networks)
    if any(r.object_store for r in config.registries):
        blobs = app[STORED_BLOBS] = StoredBlobs(config.s3, config.upstream_timeout)
        app.on_startup.append(lambda _: blobs.open())
        app.on_cleanup.append(lambda _: blobs.close())
        app[STORE_DOWN] = store_down
        if config.s3.copies_max_disk:
            copies = app[LOCAL_COPIES] = LocalCopies(config.data_dir / COPIES_DIR, config.s3.copies_max_disk, store_down)
            app.on_cleanup.insert(0, lambda _: copies.close())
    for path, handler in ROUTES.items():
        app.router.add_get(path, handler)  # and HEAD
    return app
