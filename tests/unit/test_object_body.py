"""An object's body received into reused buffers (objectstore/body.py on http_body.py), from a
real HTTP server on loopback: every byte in order however it arrives and however slowly it is
taken, at most BUFFERS buffers, a reader holding several pieces has each whole, and a body cut
short or stalled fails as the store being unreachable."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
import pytest
from aiohttp import web

from regcache_core.http_body import BUFFERS, READ_BUFFER
from regcache_core.objectstore.body import body_pieces
from regcache_core.objectstore.client import StoreUnreachable

BODY = os.urandom((5 << 20) + 12345)


async def served(answer, get):
    """Runs `answer(request)` as a loopback server's handler and returns `get(session, url)`."""
    app = web.Application()
    app.router.add_get("/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            return await get(session, f"http://127.0.0.1:{port}/")
    finally:
        await runner.cleanup()


def sending(body: bytes, declared: int, pause_every: int = 0, stall: float = 0, close: bool = False):
    async def answer(request):
        response = web.StreamResponse(headers={"Content-Length": str(declared)})
        await response.prepare(request)
        for n, start in enumerate(range(0, len(body), 300_000)):
            await response.write(body[start:start + 300_000])
            if pause_every and n % pause_every == 0:
                await asyncio.sleep(0.06)  # past FLUSH_AFTER: a part-filled buffer is handed out
        if stall:
            await asyncio.sleep(stall)
        if close or len(body) < declared:
            request.transport.close()
        return response
    return answer


@pytest.mark.parametrize("pause_every, close", [(0, False), (3, False), (0, True)])
def test_every_byte_comes_in_order_in_pieces_of_reused_buffers(pause_every, close):
    """`close`: the store closes the connection right after the whole body, before the reader
    took it all (the connection is no longer read once the body is whole: no failure)."""
    async def get(session, url):
        async with session.get(url) as response:
            digest, pieces, buffers = hashlib.sha256(), 0, set()
            async for piece in body_pieces(response, len(BODY), 5):
                assert len(piece) <= READ_BUFFER
                digest.update(piece)
                pieces += 1
                if isinstance(piece.obj, bytearray):
                    buffers.add(id(piece.obj))
                await asyncio.sleep(0.002)  # a slow taker: the others fill meanwhile
            return digest.hexdigest(), pieces, len(buffers)

    digest, pieces, buffers = asyncio.run(served(sending(BODY, len(BODY), pause_every, close=close), get))
    assert digest == hashlib.sha256(BODY).hexdigest()
    assert pieces >= len(BODY) // READ_BUFFER and buffers <= BUFFERS


def test_a_reader_holding_several_pieces_has_each_whole_until_as_many_more_are_asked_for():
    held = BUFFERS - 1

    async def get(session, url):
        async with session.get(url) as response:
            holding, offset, whole = [], 0, True
            async for piece in body_pieces(response, len(BODY), 5, held):
                holding = [*holding, (offset, piece)][-held:]
                offset += len(piece)
                await asyncio.sleep(0.05)  # the free buffer fills meanwhile
                whole &= all(bytes(p) == BODY[at:at + len(p)] for at, p in holding)
            return offset, whole

    assert asyncio.run(served(sending(BODY, len(BODY), pause_every=3), get)) == (len(BODY), True)


@pytest.mark.parametrize("stall", [0, 1.5])
def test_a_body_cut_short_or_stalled_fails_as_the_store_unreachable(stall):
    async def get(session, url):
        async with session.get(url) as response:
            taken = 0
            with pytest.raises(StoreUnreachable) as failed:
                async for piece in body_pieces(response, len(BODY), 1):
                    taken += len(piece)
            return taken, str(failed.value)

    cut = (2 << 20) + 7
    taken, why = asyncio.run(served(sending(BODY[:cut], len(BODY), stall=stall), get))
    assert taken <= cut  # the failure is raised once known: bytes of a body that cannot be whole may stay untaken
    assert ("no byte of the object for 1s" if stall else f" of {len(BODY)} bytes") in why
