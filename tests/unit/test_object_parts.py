"""An object's whole body read as several ranged GETs at once (objectstore/parts.py), from a real
HTTP server on loopback answering ranges as a store does: every byte in order, each piece whole
until `held` more are asked for, no more GETs in flight than the parts setting, one GET for a
small object, and a part that fails or answers otherwise fails the whole read, after no wrong
byte."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re

import pytest
from aiohttp import web

from regcache_core.config import ObjectStore, S3Access
from regcache_core.objectstore.blobs import StoredBlob, StoredBlobs
from regcache_core.objectstore.client import StoreUnreachable
from regcache_core.objectstore.parts import read_whole
from tests.unit.test_object_body import served

PART = 1 << 20
BODY = os.urandom(5 * PART + 12345)
HELD = 3  # copies.py's


class RangeServer:
    """Answers `Range: bytes=a-b` GETs of `body` with 206, in small writes; records each range
    and how many were answered at once. `broken(start)`: how the part starting there goes wrong."""

    def __init__(self, body: bytes = BODY, broken=lambda start: None) -> None:
        self.body, self.broken = body, broken
        self.ranges: list[tuple[int, int]] = []
        self.in_flight = self.most_in_flight = 0

    async def answer(self, request: web.Request) -> web.StreamResponse:
        first, last = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers["Range"]).groups())
        self.ranges.append((first, last))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            how = self.broken(first)
            if how == "whole":  # a 200 with every byte: not the range asked for
                return web.Response(body=self.body)
            body = self.body[first:last + 1]
            response = web.StreamResponse(status=206, headers={"Content-Length": str(len(body))})
            await response.prepare(request)
            for at in range(0, len(body), 200_000):
                if how == "cut" and at >= len(body) // 2:
                    request.transport.close()
                    return response
                await response.write(body[at:at + 200_000])
                await asyncio.sleep(0.001)
            return response
        finally:
            self.in_flight -= 1


class LocalBlobs(StoredBlobs):
    """StoredBlobs whose presigned URL is the loopback server's."""

    url = ""

    async def presigned_url(self, store, blob) -> str:
        return self.url


async def read(server: RangeServer, parts: int, received: bytearray) -> bool:
    """Puts what read_whole hands on in `received`; whether every piece held was whole until
    HELD more came."""
    async def get(_, url: str) -> bool:
        blobs = LocalBlobs(S3Access(None, "us-east-1", "", "", read_parts=parts, read_part_size=PART), 5)
        blobs.url = url
        holding, whole = [], True
        try:
            async for piece in read_whole(blobs, ObjectStore("bucket", "prefix"), StoredBlob("key", len(server.body), 0.0),
                                          HELD):
                holding = [*holding, (len(received), piece)][-HELD:]
                received.extend(piece)
                await asyncio.sleep(0.003)  # a slow writer: the parts ahead fill meanwhile
                whole &= all(bytes(p) == server.body[at:at + len(p)] for at, p in holding)
            return whole
        finally:
            await blobs.close()
    return await served(server.answer, get)


def test_the_parts_come_in_order_each_piece_whole_until_held_more_are_asked_for():
    server, received = RangeServer(), bytearray()
    assert asyncio.run(read(server, 3, received))
    assert hashlib.sha256(received).digest() == hashlib.sha256(BODY).digest()
    assert sorted(server.ranges) == [(start, min(start + PART, len(BODY)) - 1) for start in range(0, len(BODY), PART)]
    assert server.most_in_flight == 3


@pytest.mark.parametrize("parts, size", [(1, len(BODY)), (4, 2 * PART - 1)])
def test_one_part_or_an_object_below_two_parts_is_one_get(parts, size):
    server, received = RangeServer(BODY[:size]), bytearray()
    assert asyncio.run(read(server, parts, received))
    assert received == BODY[:size] and server.ranges == [(0, size - 1)]


@pytest.mark.parametrize("how, failure", [("cut", StoreUnreachable), ("whole", OSError)])
def test_a_part_cut_short_or_answered_otherwise_fails_the_read_after_no_wrong_byte(how, failure):
    server, received = RangeServer(broken=lambda start: how if start == 3 * PART else None), bytearray()
    with pytest.raises(failure):
        asyncio.run(read(server, 3, received))
    assert len(received) <= 3 * PART + PART // 2 and bytes(received) == BODY[:len(received)]
