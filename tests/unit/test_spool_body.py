"""A spooled download's body (spool/body.py): from aiohttp's answer, its headers read, into the
spool file and its hash, against raw HTTP/1.1 servers on loopback (plain and TLS) that send
exactly the bytes each test needs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from pathlib import Path

import aiohttp
import pytest

from regcache_core.spool import body
from regcache_core.spool.body import BodyFailed, receive_body
from tests.support.fakes import self_signed_tls

BLOB = os.urandom((5 << 20) + 123)  # five buffers and a bit


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def upstream(send, tls: ssl.SSLContext | None = None) -> tuple[asyncio.Server, str]:
    """A server that reads a request's head, then `send(writer)`s the answer, then closes."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await send(writer)
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    return server, f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/library/big/blobs/{digest(BLOB)}"


def head(length: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()


def in_pieces(data: bytes, piece: int = 300_000, pause: float = 0.0):
    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(data)))
        for start in range(0, len(data), piece):
            writer.write(data[start:start + piece])
            await writer.drain()
            await asyncio.sleep(pause)
    return send


def download(tmp_path: Path, send, size: int = len(BLOB), tls: ssl.SSLContext | None = None) -> tuple[int, str]:
    """The body of the answer `send` writes, received into a file under `tmp_path` (read back
    into tmp_path / "spool")."""
    async def main():
        server, url = await upstream(send, tls)
        client_tls = ssl.create_default_context()
        client_tls.check_hostname, client_tls.verify_mode = False, ssl.CERT_NONE  # the test's own certificate
        path = tmp_path / "spool"
        path.write_bytes(b"")
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls)) as session:
                async with session.get(url) as response:
                    return await asyncio.wait_for(receive_body(response, str(path), size, "sha256"), 30)
        finally:
            server.close()

    return asyncio.run(main())


def test_a_body_of_several_buffers_lands_whole_with_its_digest(tmp_path):
    assert download(tmp_path, in_pieces(BLOB)) == (len(BLOB), digest(BLOB))
    assert (tmp_path / "spool").read_bytes() == BLOB


def test_over_tls_the_body_lands_whole_with_its_digest(tmp_path):
    tls = self_signed_tls(tmp_path)
    assert download(tmp_path, in_pieces(BLOB, pause=0.001), tls=tls) == (len(BLOB), digest(BLOB))
    assert (tmp_path / "spool").read_bytes() == BLOB


def test_a_body_that_came_with_its_headers(tmp_path):
    small = BLOB[:1000]

    async def send(writer):
        writer.write(head(len(small)) + small)

    assert download(tmp_path, send, len(small)) == (len(small), digest(small))
    assert (tmp_path / "spool").read_bytes() == small


def test_a_body_ending_short_of_its_length_fails(tmp_path):
    async def send(writer):
        writer.write(head(len(BLOB)) + BLOB[:len(BLOB) // 2])

    with pytest.raises((BodyFailed, aiohttp.ClientPayloadError)):
        download(tmp_path, send)
    assert len((tmp_path / "spool").read_bytes()) <= len(BLOB) // 2


def test_bytes_past_the_content_length_are_not_read(tmp_path):
    async def send(writer):
        writer.write(head(len(BLOB)) + BLOB + b"a second answer, never the blob's")
        await writer.drain()

    assert download(tmp_path, send) == (len(BLOB), digest(BLOB))
    assert (tmp_path / "spool").read_bytes() == BLOB


def test_a_body_that_stalls_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(body, "BODY_STALL", 0.5)

    async def send(writer):
        writer.write(head(len(BLOB)) + BLOB[:3 << 20])
        await writer.drain()
        await asyncio.sleep(10)

    with pytest.raises(TimeoutError):
        download(tmp_path, send)
    assert (tmp_path / "spool").read_bytes() == BLOB[:3 << 20], "what came is written"


def test_a_slow_body_reaches_the_file_before_its_buffer_is_full(tmp_path):
    written: list[int] = []

    async def send(writer):
        writer.write(head(len(BLOB)) + BLOB[:4096])
        await writer.drain()
        await asyncio.sleep(body.FLUSH_EVERY * 3)
        written.append((tmp_path / "spool").stat().st_size)
        writer.write(BLOB[4096:])

    assert download(tmp_path, send) == (len(BLOB), digest(BLOB))
    assert written == [4096]


def test_a_spool_file_that_is_gone_fails_the_body(tmp_path):
    async def main():
        server, url = await upstream(in_pieces(BLOB))
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                await receive_body(response, str(tmp_path / "removed"), len(BLOB), "sha256")
        finally:
            server.close()

    with pytest.raises(FileNotFoundError):
        asyncio.run(main())
