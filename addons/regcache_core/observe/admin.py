"""The admin endpoint: /metrics, /ready and /live on a listener of their own.

A small asyncio server inside the proxy process, on REGCACHE_ADMIN_HOST:REGCACHE_ADMIN_PORT.
Not a second mitmproxy mode: admin requests would then be flows, passing through routing, the
pull log, metrics and mitmweb's flow list, each of which would have to recognise and skip them.
Here they never enter mitmproxy at all, and no Host header or path on the mirror port can
reach them.

- /live answers from the proxy's event loop, so an answer proves the loop is not stuck. It says
  nothing else, so it needs no token (`regcache up` and liveness probes ask it).
- With REGCACHE_ADMIN_TOKEN set, /metrics and /ready need `Authorization: Bearer <token>`
  (401 otherwise): they name the registries, backends and disks.
- /ready checks that the proxy's listeners run, that every cache backend answers
  `GET /v2/`, all backends at once, each within BACKEND_TIMEOUT, and that the caches run here
  have disk to store new content on (budget/disk.py). Its body also shows each upstream's
  state (upstream_state.py), which does not change the answer: with an upstream down, the
  caches still serve what they hold.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

BACKEND_TIMEOUT = 2.0  # seconds; probes wait this long for a backend's status line
REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request head
MAX_REQUEST_HEAD = 8192  # bytes; a longer request head gets no answer


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes

    @classmethod
    def json(cls, status: int, document: dict) -> "Answer":
        return cls(status, "application/json", json.dumps(document, sort_keys=True).encode() + b"\n")


REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


async def probe_backend(url: str, timeout: float = BACKEND_TIMEOUT) -> str:
    """"ok" if `GET <url>/v2/` gets an HTTP status below 500 in time, else why not.

    401 counts as an answer: a cache in front of an authenticating registry may ask for it.
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                parts.hostname, port, ssl=ssl.create_default_context() if parts.scheme == "https" else None
            )
            writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            status_line = await reader.readline()
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except OSError as e:
        return f"unreachable: {e.strerror or e}"
    finally:
        if writer is not None:
            writer.close()
    fields = status_line.split()
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return "answered, but not with HTTP"
    status = int(fields[1])
    return "ok" if status < 500 else f"answered {status}"


async def readiness(proxy_serves: bool, backends: dict[str, str], upstreams: dict[str, str],
                    timeout: float = BACKEND_TIMEOUT, disks: dict[str, str] | None = None,
                    shared_state: str | None = None) -> Answer:
    """200 when the proxy serves and every backend (name -> base URL) answers, else 503.

    `upstreams` (name -> "up" or "down: <reason>") is shown, not judged. `disks` (name -> "ok"
    or what is wrong) says whether a cache run here can store more; an answering cache whose
    disk cannot is reported with that reason. `shared_state` (replicas only: "ok" or why each
    replica goes on alone) is shown, not judged: Redis trouble never stops a pull.
    """
    results = await asyncio.gather(*(probe_backend(url, timeout) for url in backends.values()))
    checks = dict(zip(backends, results))
    for name, state in (disks or {}).items():
        if checks.get(name) == "ok":
            checks[name] = state
    ready = proxy_serves and all(result == "ok" for result in checks.values())
    document = {"ready": ready, "proxy": "ok" if proxy_serves else "not serving", "backends": checks,
                "upstreams": upstreams}
    if shared_state is not None:
        document["shared_state"] = shared_state
    return Answer.json(200 if ready else 503, document)


class AdminServer:
    """Serves GET requests (HTTP/1.x, one per connection) by path, from async handlers."""

    def __init__(self, routes: dict[str, Callable[[], Awaitable[Answer]]], open_paths: tuple[str, ...] = ()) -> None:
        self.routes = routes
        self.open_paths = open_paths  # paths served without the token
        self.token = ""  # empty: none asked
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_HEAD)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            answer = await self._answer(head)
            challenge = 'WWW-Authenticate: Bearer realm="regcache admin"\r\n' if answer.status == 401 else ""
            writer.write(
                f"HTTP/1.1 {answer.status} {REASONS.get(answer.status, '')}\r\n"
                f"Content-Type: {answer.content_type}\r\nContent-Length: {len(answer.body)}\r\n{challenge}"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode() + answer.body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that sends no whole request head, or goes away, gets nothing
        except Exception:
            logger.exception("regcache admin endpoint: request failed")
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> Answer:
        fields = head.split(b"\r\n", 1)[0].split()
        if len(fields) != 3 or not fields[2].startswith(b"HTTP/1."):
            return Answer.json(400, {"error": "not an HTTP/1.x request line"})
        method, target = fields[0].decode("latin-1"), fields[1].decode("latin-1")
        path = target.split("?", 1)[0]
        handler = self.routes.get(path)
        if handler is None:
            return Answer.json(404, {"error": f"no such path; try {', '.join(self.routes)}"})
        if method != "GET":
            return Answer.json(405, {"error": "GET only"})
        if self.token and path not in self.open_paths and not self._authorized(head):
            return Answer.json(401, {"error": "this path needs Authorization: Bearer <REGCACHE_ADMIN_TOKEN>"})
        return await handler()

    def _authorized(self, head: bytes) -> bool:
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            scheme, _, token = value.strip().partition(b" ")
            if name.strip().lower() == b"authorization" and scheme.lower() == b"bearer":
                return hmac.compare_digest(token.strip(), self.token.encode())
        return False
