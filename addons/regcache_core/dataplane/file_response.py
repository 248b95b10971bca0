"""Sending one open file as registry:2 sends a blob: its headers, Range and conditional requests,
the bytes by sendfile; or a spool's file while its download writes it (spool/table.py).

The file is opened before anything is sent, and only the open file is read: a blob the cache
evicts (unlinks) meanwhile is still sent whole. If fewer bytes come than its size said (the
file was cut short under us) or the client stops reading, the connection is cut, so a client
never takes a short body for a complete one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import BinaryIO

from aiohttp import web

from ..spool.table import SpoolBroken

# Bytes per sendfile call, each of which must finish within SEND_TIMEOUT: a client reading
# slower than ~55 KB/s is cut off. Smaller calls were measured slower (2 MiB: no faster than
# registry:2 itself; 16 MiB: 1.2-1.5x it, on a loaded 2-core box).
SEND_CHUNK = 16 << 20
SEND_TIMEOUT = 300.0


@dataclass(frozen=True)
class Plan:
    """What to answer: status, headers, and which bytes of the file (none for 304, 412, 416)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    start: int = 0
    count: int = 0


def blob_headers(digest: str, mtime: float) -> dict[str, str]:
    """registry:2's headers for a blob, those of every status."""
    return {
        "Docker-Content-Digest": digest, "ETag": f'"{digest}"', "Last-Modified": formatdate(int(mtime), usegmt=True),
        "Accept-Ranges": "bytes", "Cache-Control": "max-age=31536000",
    }


def plan(request: web.BaseRequest, size: int, mtime: float, digest: str) -> Plan:
    """The answer to a GET or HEAD of a blob of `size` bytes, last modified at `mtime`.

    Conditions are checked in RFC 9110's order (13.2.2): If-Match, If-Unmodified-Since,
    If-None-Match, If-Modified-Since, then Range (with If-Range). The ETag is the digest, as
    registry:2 sends it.
    """
    etag = f'"{digest}"'
    modified = int(mtime)  # HTTP dates have whole seconds
    headers = blob_headers(digest, mtime)
    if_match, if_none_match = request.if_match, request.if_none_match
    if if_match is not None and not _matches(digest, if_match, weak=False):
        return Plan(412, headers)
    if if_match is None and (since := request.if_unmodified_since) and modified > since.timestamp():
        return Plan(412, headers)
    if if_none_match is not None:
        if _matches(digest, if_none_match, weak=True):
            return Plan(304, headers)
    elif (since := request.if_modified_since) and modified <= since.timestamp():
        return Plan(304, headers)

    headers["Content-Type"] = "application/octet-stream"
    asked = request.headers.get("Range")
    # Several ranges (multipart answers) are ignored, as RFC 9110 allows: no registry client asks for them.
    if asked is None or "," in asked or not _if_range_holds(request, etag, modified):
        return Plan(200, {**headers, "Content-Length": str(size)}, 0, size)
    try:
        wanted = request.http_range
    except ValueError:
        return Plan(416, {**headers, "Content-Range": f"bytes */{size}"})
    if wanted.stop is None and wanted.start < 0:  # bytes=-N: the last N bytes
        start = max(size + wanted.start, 0)
        end = size
    else:
        start, end = wanted.start, min(wanted.stop if wanted.stop is not None else size, size)
    if start >= size:
        return Plan(416, {**headers, "Content-Range": f"bytes */{size}"})
    count = end - start
    return Plan(206, {**headers, "Content-Length": str(count), "Content-Range": f"bytes {start}-{end - 1}/{size}"},
                start, count)


def _matches(digest: str, etags, weak: bool) -> bool:
    return any(etag.value in ("*", digest) and (weak or not etag.is_weak) for etag in etags)


def _if_range_holds(request: web.BaseRequest, etag: str, modified: int) -> bool:
    """True when there is no If-Range, or it names this blob (its ETag, or a date not before it)."""
    value = request.headers.get("If-Range")
    if value is None:
        return True
    if value.startswith(('"', "W/")):
        return value == etag  # a strong comparison: a weak ETag never matches
    since = request.if_range
    return since is not None and modified <= since.timestamp()


async def send(request: web.BaseRequest, file: BinaryIO, plan: Plan, on_sent,
               ready: Callable[[int], Awaitable[int]] | None = None) -> tuple[web.StreamResponse, str | None]:
    """Answer with `plan`, its bytes read from `file` by sendfile; calls `on_sent(n)` as bytes go.
    `ready(offset)`, for a file still being written (a spool), waits until bytes past `offset`
    may be sent and says up to where; it raises SpoolBroken when they never may.

    Returns the response, and why the transfer failed (the connection is cut then) or None.
    """
    response = web.StreamResponse(status=plan.status, headers=plan.headers)
    transport = request.transport
    loop = asyncio.get_running_loop()
    offset, end = plan.start, plan.start + plan.count
    try:
        await response.prepare(request)  # a StreamResponse sends its headers at once
        while request.method != "HEAD" and offset < end:
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client closed the connection")
            limit = end if ready is None else await ready(offset)
            async with asyncio.timeout(SEND_TIMEOUT):
                sent = await loop.sendfile(transport, file, offset, min(SEND_CHUNK, limit - offset))
            if sent == 0:
                raise ConnectionAbortedError(f"the file ended at byte {offset} of {end}: it was cut short")
            offset += sent
            on_sent(sent)
        await response.write_eof()
    except TimeoutError:
        return response, _cut(transport, file, offset, on_sent,
                              f"the client did not read {SEND_CHUNK >> 20} MiB in {SEND_TIMEOUT:.0f}s")
    except (OSError, SpoolBroken) as e:
        return response, _cut(transport, file, offset, on_sent, str(e) or type(e).__name__)
    return response, None


def _cut(transport, file: BinaryIO, offset: int, on_sent, reason: str) -> str:
    # asyncio leaves the file's position where a failed sendfile stopped: count those bytes too.
    on_sent(max(0, os.lseek(file.fileno(), 0, os.SEEK_CUR) - offset))
    if transport is not None:
        transport.abort()
    return reason


def open_file(path: os.PathLike) -> tuple[BinaryIO, os.stat_result] | None:
    """The file, open, and its status; None if it is gone. Blocking: call it in a thread."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return None
    try:
        return file, os.fstat(file.fileno())
    except OSError:
        file.close()
        raise
