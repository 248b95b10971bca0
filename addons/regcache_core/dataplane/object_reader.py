"""Sending a warm blob from an object store (K_STORAGE=s3://): the object (the range asked
for) is read from the store and written to the client as it comes, memory per transfer bounded
by the read buffer (objectstore/blobs.py's STREAM_BUFFER), with the same headers, Range and
conditions as a file (file_response.plan). A store that stops answering, or a client that stops
reading, cuts the connection: never a short body passed off as complete."""

from __future__ import annotations

import asyncio

from aiohttp import web
from botocore.exceptions import ClientError

from ..config import Registry
from ..objectstore.blobs import StoredBlobs
from ..objectstore.client import StoreUnreachable
from ..routing import Refusal, store_unreachable
from .exchange import Exchange, refused
from .file_response import SEND_TIMEOUT, plan
from .grants import Grant

STORED_BLOBS = web.AppKey("stored_blobs", StoredBlobs)  # this worker's S3 client, with caches on a store only


async def send_object(request: web.Request, exchange: Exchange, grant: Grant, registry: Registry) -> web.StreamResponse:
    blobs = request.app[STORED_BLOBS]
    store = registry.object_store
    try:
        blob = await blobs.warm(store, grant.repository, grant.digest)
    except StoreUnreachable as e:
        return refused(store_unreachable(registry, blobs.access.describe(), str(e)))
    except ClientError:
        blob = None
    if blob is None or blob.size != grant.size:
        return refused(Refusal(404, "BLOB_UNKNOWN", f"{grant.digest} is not in the cache of {grant.registry}/{grant.repository}"))
    exchange.served = True
    answer = plan(request, blob.size, blob.mtime, grant.digest)
    response = web.StreamResponse(status=answer.status, headers=answer.headers)
    await response.prepare(request)
    if request.method == "HEAD" or answer.count == 0:
        await response.write_eof()
        return response
    sent = 0
    try:
        async for chunk in blobs.stream(store, blob, answer.start, answer.count):
            part = chunk[:answer.count - sent]
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
        exchange.error = f"the object store: {e}"
    except OSError as e:  # the client went, or the store answered otherwise
        exchange.error = str(e)
    else:
        return response
    if request.transport is not None:
        request.transport.abort()
    return response
