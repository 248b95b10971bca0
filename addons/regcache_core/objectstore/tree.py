"""A cache's storage root in an object store, as the disk budget and `regcache cache` read it
(budget/storage.py's Tree): its objects listed, read and deleted with the S3 API. Blocking calls
for the budget's own thread (or a command), on an event loop of this object's own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from ..config import ObjectStore, S3Access
from .client import StoreRefused, client_context, within

DELETE_BATCH = 1000  # keys per DeleteObjects call: the API's limit


class ObjectTree:
    def __init__(self, access: S3Access, store: ObjectStore, timeout: float) -> None:
        self.access = access
        self.store = store
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context = None
        self._s3 = None

    def _run(self, call):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._context = client_context(self.access, self.timeout)
            self._s3 = self._loop.run_until_complete(self._context.__aenter__())
        return self._loop.run_until_complete(call)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self._context.__aexit__(None, None, None))
            self._loop.close()
            self._loop = None

    def _key(self, path: str) -> str:
        return self.store.key(path)

    def files(self, under: str = "") -> Iterator[tuple[str, int, float]]:
        root = self._key("")
        return iter([(key[len(root):], size, mtime) for key, size, mtime in self._run(self._list(self._key(under)))])

    async def _list(self, prefix: str) -> list[tuple[str, int, float]]:
        found, token = [], None
        while True:
            more = {"ContinuationToken": token} if token else {}
            page = await within(self.timeout, lambda: self._s3.list_objects_v2(
                Bucket=self.store.bucket, Prefix=prefix, **more))
            found += [(o["Key"], o["Size"], o["LastModified"].timestamp()) for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return found
            token = page["NextContinuationToken"]

    def read(self, path: str, limit: int) -> bytes | None:
        return self._run(self._read(self._key(path), limit))

    async def _read(self, key: str, limit: int) -> bytes | None:
        async def get() -> bytes:
            answer = await self._s3.get_object(Bucket=self.store.bucket, Key=key)
            async with answer["Body"] as body:
                return await body.read(limit)
        try:
            return await within(self.timeout, get)
        except StoreRefused as e:
            if e.missing:
                return None
            raise

    def remove(self, path: str) -> None:
        self._run(self._remove(self._key(path)))

    async def _remove(self, key: str) -> None:
        keys = [key, *(k for k, _, _ in await self._list(key + "/"))]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start:start + DELETE_BATCH]]
            await within(self.timeout, lambda: self._s3.delete_objects(
                Bucket=self.store.bucket, Delete={"Objects": batch, "Quiet": True}))

    def __str__(self) -> str:
        return str(self.store)
