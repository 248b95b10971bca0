"""Warm blobs in an object store, as the proxy and the data plane use them: whether a cache holds
a blob for a repository (registry:2's link, and the data), a small one read whole, a presigned
URL of one, and one streamed by ranges. One S3 client per process, opened on first use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from botocore.exceptions import ClientError

from ..config import ObjectStore, S3Access
from . import layout
from .client import client_context, status, within

PRESIGNED_FOR = 300  # seconds a presigned URL is valid: as long as a data-plane grant
READ_CHUNK = 1 << 20  # bytes read from the store at a time while streaming: memory per transfer stays bounded


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
        self._opening = asyncio.Lock()

    async def _s3(self):
        async with self._opening:
            if self._client is None:
                self._context = client_context(self.access, self.timeout)
                self._client = await self._context.__aenter__()
        return self._client

    async def close(self) -> None:
        if self._context is not None:
            context, self._context, self._client = self._context, None, None
            await context.__aexit__(None, None, None)

    async def warm(self, store: ObjectStore, repository: str, digest: str) -> StoredBlob | None:
        """The blob's data object when the cache holds it and `repository` may serve it, else
        None. Raises StoreUnreachable when the store does not answer."""
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

    async def stream(self, store: ObjectStore, blob: StoredBlob, start: int, count: int) -> AsyncIterator[bytes]:
        """Bytes `start` to `start + count` of the object, READ_CHUNK at a time, each read within
        the deadline. Raises StoreUnreachable, or ClientError when the object is gone."""
        s3 = await self._s3()
        wanted = f"bytes={start}-{start + count - 1}"
        answer = await within(self.timeout, lambda: s3.get_object(Bucket=store.bucket, Key=blob.key, Range=wanted))
        async with answer["Body"] as body:
            while chunk := await within(self.timeout, lambda: body.read(READ_CHUNK)):
                yield chunk

    async def probe(self, store: ObjectStore) -> None:
        """Returns once the store answers for the bucket (any answer but a 5xx); raises why not."""
        s3 = await self._s3()
        await _unless_missing(within(self.timeout, lambda: s3.head_bucket(Bucket=store.bucket)), refusals_too=True)


async def _unless_missing(call, refusals_too: bool = False):
    """The call's result, or None when the store says the object (or bucket) is not there."""
    try:
        return await call
    except ClientError as e:
        if status(e) == 404 or refusals_too:
            return None
        raise
