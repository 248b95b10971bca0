"""Warm blobs in an object store, as the proxy and the data plane use them: whether a cache holds
a blob for a repository (registry:2's link, and the data), a small one read whole, a presigned
URL of one, and one streamed by ranges. One S3 client per process, opened on first use."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from ..config import ObjectStore, S3Access
from . import layout
from .body import body_pieces
from ..http_body import BUFFERS
from ..upstream.state import failure_reason
from .client import StoreRefused, StoreUnreachable, client_context, within

PRESIGNED_FOR = 300  # seconds a presigned URL is valid: as long as a data-plane grant


@dataclass(frozen=True)
class StoredBlob:
    key: str  # the data object's key
    size: int
    mtime: float  # its Last-Modified, as a timestamp


class StoredBlobs:
    def __init__(self, access: S3Access, timeout: float) -> None:
        self.access = access
        self.timeout = timeout  # seconds every call gets to be answered (a stream: each read)
        self._client = None
        self._context = None
        self._http: aiohttp.ClientSession | None = None  # streams by presigned URL
        self._opening = asyncio.Lock()

    async def _s3(self):
        async with self._opening:
            if self._client is None:
                self._context = client_context(self.access, self.timeout)
                self._client = await self._context.__aenter__()
        return self._client

    def _streams(self) -> aiohttp.ClientSession:
        if self._http is None:
            # The CA bundle botocore trusts (AWS_CA_BUNDLE), for a store behind a private CA.
            trusted = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=trusted),
                timeout=aiohttp.ClientTimeout(sock_connect=self.timeout, sock_read=self.timeout),
                auto_decompress=False)
        return self._http

    async def open(self) -> None:
        """Make the clients now (the data plane's workers, at start): botocore's service models
        and the CA bundle take a few tenths of a second of CPU to load, which a worker's first
        GET would otherwise wait for. Nothing is asked of the store."""
        await self._s3()
        self._streams()

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()
        if self._context is not None:
            context, self._context, self._client = self._context, None, None
            await context.__aexit__(None, None, None)

    async def warm(self, store: ObjectStore, repository: str, digest: str) -> StoredBlob | None:
        """The blob's data object when the cache holds it and `repository` may serve it, else
        None. Raises StoreUnreachable when the store does not answer, StoreRefused when it refuses."""
        if not layout.valid(repository, digest):
            return None
        s3 = await self._s3()
        link, data = store.key(layout.layer_link(repository, digest)), store.key(layout.blob_data(digest))

        async def linked() -> bool:
            answer = await s3.get_object(Bucket=store.bucket, Key=link)
            async with answer["Body"] as body:
                return (await body.read(200)).strip() == digest.encode()

        results = await asyncio.gather(
            _unless_missing(within(self.timeout, linked)),
            _unless_missing(within(self.timeout, lambda: s3.head_object(Bucket=store.bucket, Key=data))),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        is_linked, head = results
        if not is_linked or head is None:
            return None
        return StoredBlob(data, head["ContentLength"], head["LastModified"].timestamp())

    async def read(self, store: ObjectStore, blob: StoredBlob) -> bytes | None:
        """A small blob's bytes, whole; None when it is gone or not its size."""
        s3 = await self._s3()

        async def get() -> bytes:
            answer = await s3.get_object(Bucket=store.bucket, Key=blob.key)
            async with answer["Body"] as body:
                return await body.read(blob.size + 1)

        body = await _unless_missing(within(self.timeout, get))
        return body if body is not None and len(body) == blob.size else None

    async def presigned_url(self, store: ObjectStore, blob: StoredBlob) -> str:
        s3 = await self._s3()
        return await s3.generate_presigned_url("get_object", Params={"Bucket": store.bucket, "Key": blob.key},
                                               ExpiresIn=PRESIGNED_FOR)

    async def stream(self, store: ObjectStore, blob: StoredBlob, start: int, count: int,
                     held: int = 1, buffers: int = BUFFERS) -> AsyncIterator[memoryview]:
        """Bytes `start` to `start + count` of the object, as they arrive, each read within the
        deadline, in pieces each valid until `held` more are asked for (body.py: received into
        `buffers` buffers of READ_BUFFER bytes, reused). Read by a presigned URL with a plain
        aiohttp session: 1.3-1.5x the bytes per second of botocore's streaming body on these
        machines. Raises StoreUnreachable, or OSError when the store answers otherwise (the
        object went, say)."""
        url = await self.presigned_url(store, blob)
        try:
            async with self._streams().get(url, headers={"Range": f"bytes={start}-{start + count - 1}"}) as answer:
                if answer.status >= 500:
                    raise StoreUnreachable(f"answered {answer.status}")
                if answer.status != 206:
                    raise OSError(f"the object store answered {answer.status} for {blob.key}")
                if answer.content_length != count:
                    raise OSError(f"the object store answered {answer.content_length} bytes for {count}")
                async for piece in body_pieces(answer, count, self.timeout, held, buffers):
                    yield piece
        except (aiohttp.ClientError, TimeoutError) as e:
            raise StoreUnreachable(failure_reason(e)) from e

    async def probe(self, store: ObjectStore) -> None:
        """Returns once the store answers for the bucket (any answer but a 5xx); raises why not."""
        s3 = await self._s3()
        await _unless_missing(within(self.timeout, lambda: s3.head_bucket(Bucket=store.bucket)), refusals_too=True)


async def _unless_missing(call, refusals_too: bool = False):
    """The call's result, or None when the store says the object (or bucket) is not there."""
    try:
        return await call
    except StoreRefused as e:
        if e.missing or refusals_too:
            return None
        raise
