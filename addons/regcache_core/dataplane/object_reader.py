"""Sending a warm blob from an object store (K_STORAGE=s3://). With local copies on
(objectstore/copies.py) a whole GET is sent the blob's copy by sendfile, while one read from the
store writes it (by several ranged GETs at once: objectstore/parts.py) or once it is written,
and a Range GET the copy when there is one; otherwise the object (the range asked for) is
streamed from the store and written to the client as it comes, memory per transfer bounded by
the read buffers (objectstore/body.py). The same headers, Range and conditions as a file
(file_response.plan) either way. A store that stops answering, or a client that stops reading,
cuts the connection: never a short body passed off as complete. A store that does not answer is
reported to the proxy (STORE_DOWN), whose health of it /ready and the 503s of warm pulls
follow."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from ..config import Registry
from ..objectstore.blobs import StoredBlob, StoredBlobs
from ..objectstore.client import StoreRefused, StoreUnreachable
from ..objectstore.copies import LocalCopies
from ..objectstore.parts import read_whole
from ..routing import Refusal, store_unreachable
from .exchange import Exchange, refused
from .file_response import SEND_TIMEOUT, Plan, plan, send
from .grants import Grant

STORED_BLOBS = web.AppKey("stored_blobs", StoredBlobs)  # this worker's S3 client, with caches on a store only
LOCAL_COPIES = web.AppKey("local_copies", LocalCopies)  # with REGCACHE_S3_COPIES_MAX_DISK above 0 only
STORE_DOWN = web.AppKey("store_down", Callable[[str], None])  # (reason): tells the proxy the store did not answer


async def send_object(request: web.Request, exchange: Exchange, grant: Grant, registry: Registry) -> web.StreamResponse:
    blobs = request.app[STORED_BLOBS]
    store = registry.object_store
    try:
        blob = await blobs.warm(store, grant.repository, grant.digest)
    except StoreUnreachable as e:
        request.app[STORE_DOWN](str(e))
        return refused(store_unreachable(registry, blobs.access.describe(), str(e)))
    except StoreRefused:
        blob = None
    if blob is None or blob.size != grant.size:
        return refused(Refusal(404, "BLOB_UNKNOWN", f"{grant.digest} is not in the cache of {grant.registry}/{grant.repository}"))
    exchange.served = True
    answer = plan(request, blob.size, blob.mtime, grant.digest)
    copies = request.app.get(LOCAL_COPIES)
    if copies is not None and answer.count > 0 and request.method == "GET":
        copy = await copies.open(grant.digest, blob.size, lambda held: read_whole(blobs, store, blob, held),
                                 start=answer.count == blob.size)
        if copy is not None:
            try:
                response, exchange.error = await send(request, copy.file, answer, exchange.count,
                                                      copy.progress and copy.progress.ready)
            finally:
                copy.file.close()
            return response
    return await _stream(request, exchange, blobs, store, blob, answer)


async def _stream(request: web.Request, exchange: Exchange, blobs: StoredBlobs, store, blob: StoredBlob,
                  answer: Plan) -> web.StreamResponse:
    """The range `answer` plans, streamed from the store as it comes."""
    response = web.StreamResponse(status=answer.status, headers=answer.headers)
    await response.prepare(request)
    if request.method == "HEAD" or answer.count == 0:
        await response.write_eof()
        return response
    sent = 0
    try:
        async for piece in blobs.stream(store, blob, answer.start, answer.count):
            # A copy: the transport may keep what it could not send yet, and the piece's buffer
            # is filled again once the next piece is asked for.
            part = bytes(piece)
            async with asyncio.timeout(SEND_TIMEOUT):
                await response.write(part)
            sent += len(part)
            exchange.count(len(part))
        if sent < answer.count:
            raise ConnectionAbortedError(f"the object ended at byte {answer.start + sent} of {answer.start + answer.count}")
        await response.write_eof()
    except TimeoutError:
        exchange.error = f"the client did not take what the store sent in {SEND_TIMEOUT:.0f}s"
    except StoreUnreachable as e:
        request.app[STORE_DOWN](str(e))
        exchange.error = f"the object store: {e}"
    except OSError as e:  # the client went, or the store answered otherwise
        exchange.error = str(e)
    else:
        return response
    if request.transport is not None:
        request.transport.abort()
    return response
