"""The download worker: the process that moves cold blobs' bytes from their upstream to their
spool files, so that they never cross the proxy's event loop (mitmproxy's, on one core, where
they went at about 150 MB/s). `python -m regcache_core.spool.worker PARENT_PID FD`: the proxy
starts it (worker_link.py) and owns it; it dies with the proxy (parent-death signal) and ends
when the proxy closes its end of the socket pair FD.

It only moves bytes: every decision (which blob, single flight, whether to spool, whether the
bytes are right, accounting, logging) stays in the proxy. Over FD, JSON lines. The proxy asks:

- `{"op": "fetch", "id", "method": "GET"|"HEAD", "url", "authorization", "registry",
  "upstream", "timeout"}`: ask the upstream, with the Authorization header (credentials come
  only this way: never in the arguments or the environment), and follow its redirects where
  they may lead (upstream/redirects.py: checked, connected to at the checked address, no
  credentials to a redirect's target), all within `timeout` seconds;
- `{"op": "write", "id", "path", "size", "algorithm"}`: the final answer was a GET's 200 the
  proxy spools: write its body into `path` (the proxy made the file; a file that is gone means
  the spool failed) and hash it (body.py);
- `{"op": "drop", "id"}`: stop that exchange (whatever it was doing) and forget it.

It tells, for each id: `{"event": "answer", "status", "headers", "redirected", "final"}` for
every answer on the way (what the proxy reports as the upstream's), then for a GET's 200 it was
told to write, `{"event": "done", "received", "digest"}` or `{"event": "failed", "reason"}`;
or `{"event": "no_answer", "reason", "answered"}` (upstream/client.py's NoAnswer) or
`{"event": "refused", "reason", "warning"}` (a redirect where it may not lead) instead of a
final answer. An answer that is not written (a HEAD, an error, a spool declined) is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp

from ..config import Registry, is_local
from ..stack.parent_death import die_with_parent
from ..upstream.client import NoAnswer, UpstreamClient, bounded
from ..upstream.client import describe as describe_error
from ..upstream.redirects import TooManyRedirects, follow_redirects, may_lead_to, redirect_location, resolve_destination
from .body import receive_body

POOL_SIZE = 64  # exchanges at once, to all upstreams (downloads are long)
MESSAGE_LIMIT = 1 << 20  # bytes of one JSON line (an answer's headers)


class Refused(Exception):
    """A redirect leads where it may not; `warning`: a line for the proxy's log, if it needs one."""

    def __init__(self, reason: str, warning: str | None = None) -> None:
        super().__init__(reason)
        self.warning = warning


class Worker:
    """The exchanges of one worker process, by the proxy's ids."""

    def __init__(self, tell: Callable[[dict], None]) -> None:
        self.tell = tell
        self.client = UpstreamClient(pool_size=POOL_SIZE)
        self.exchanges: dict[int, asyncio.Task] = {}
        self.decisions: dict[int, asyncio.Future] = {}  # a GET's 200 waiting for "write" or "drop"

    def handle(self, message: dict) -> None:
        op, id = message["op"], message["id"]
        if op == "fetch":
            task = asyncio.get_running_loop().create_task(self._exchange(id, message))
            self.exchanges[id] = task
            task.add_done_callback(lambda _: self._forget(id, task))
        elif op == "write":
            if (decision := self.decisions.get(id)) is not None and not decision.done():
                decision.set_result(message)
        elif op == "drop":
            if (task := self.exchanges.get(id)) is not None:
                task.cancel()

    async def close(self) -> None:
        for task in list(self.exchanges.values()):
            task.cancel()
        await asyncio.gather(*self.exchanges.values(), return_exceptions=True)
        await self.client.close()

    def _forget(self, id: int, task: asyncio.Task) -> None:
        if self.exchanges.get(id) is task:
            del self.exchanges[id]
        self.decisions.pop(id, None)

    async def _exchange(self, id: int, message: dict) -> None:
        registry = Registry("", message["registry"], message["upstream"], None)
        try:
            response = await self._answer(id, registry, message)
        except NoAnswer as e:
            self.tell({"id": id, "event": "no_answer", "reason": e.reason, "answered": e.answered})
            return
        except Refused as e:
            self.tell({"id": id, "event": "refused", "reason": str(e), "warning": e.warning})
            return
        async with response:
            if message["method"] != "GET" or response.status != 200:
                return
            decision = self.decisions[id] = asyncio.get_running_loop().create_future()
            write = await decision
            try:
                received, digest = await receive_body(response, write["path"], write["size"], write["algorithm"])
            except Exception as e:  # the upstream, the network or the disk failed
                reason = "the body stalled" if isinstance(e, TimeoutError) else describe_error(e)
                self.tell({"id": id, "event": "failed", "reason": reason})
                return
        self.tell({"id": id, "event": "done", "received": received, "digest": digest})

    async def _answer(self, id: int, registry: Registry, message: dict) -> aiohttp.ClientResponse:
        """The answer at the end of the redirects, headers read, each answer on the way told."""
        method, authorization = message["method"], message["authorization"]

        async def fetch(url: str, redirected_from: str | None) -> tuple[aiohttp.ClientResponse, str | None]:
            if redirected_from is None:
                response = await self._send(method, url, {"Authorization": authorization} if authorization else {})
            else:
                # A redirect target gets no credentials, as when the caches follow one through the proxy.
                response = await self._send(method, url, {}, await checked_address(registry, url))
            location = redirect_location(response.status, response.headers)
            self.tell({"id": id, "event": "answer", "status": response.status, "headers": list(response.headers.items()),
                       "redirected": redirected_from is not None, "final": location is None})
            if location is not None:
                response.release()
            return response, location

        try:
            async with bounded(message["timeout"]):
                return await follow_redirects(message["url"], fetch)
        except TooManyRedirects as e:
            raise Refused(str(e)) from None

    async def _send(self, method: str, url: str, headers: dict[str, str],
                    address: str | None = None) -> aiohttp.ClientResponse:
        """`method url`, connected to `address` when given (the name stays in Host and TLS's SNI)."""
        parts = urlsplit(url)
        options = {}
        if address is not None:
            headers = {**headers, "Host": parts.netloc}
            host = f"[{address}]" if ":" in address else address
            url = parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()
            if parts.scheme == "https":
                options["server_hostname"] = parts.hostname
        return await self.client.session().request(method, url, headers=headers, allow_redirects=False, **options)


async def checked_address(registry: Registry, url: str) -> str:
    """Where a redirect to `url` connects; Refused where it may not lead (redirects.py)."""
    host = urlsplit(url).hostname or ""
    if not may_lead_to(registry, url):
        raise Refused(f"redirected to {urlsplit(url).scheme}://{host}, where its redirects may not lead")
    destination = await resolve_destination(host)
    if not is_local(registry.upstream) and destination.internal:
        raise Refused(f"redirected to {host}, an internal address",
                      f"refused a redirect of {registry.name}'s upstream to {host}: it is this machine or its link")
    if destination.address is None:
        raise NoAnswer(f"name lookup failed for {host}", answered=True)
    return destination.address


async def serve(connection: socket.socket) -> None:
    """Handle the proxy's messages on `connection` until the proxy closes it."""
    reader, writer = await asyncio.open_connection(sock=connection, limit=MESSAGE_LIMIT)

    def tell(event: dict) -> None:
        writer.write(json.dumps(event).encode() + b"\n")

    worker = Worker(tell)
    try:
        while line := await reader.readline():
            worker.handle(json.loads(line))
    finally:
        await worker.close()
        with contextlib.suppress(OSError):
            writer.close()


def main(argv: list[str]) -> int:
    parent, fd = int(argv[1]), int(argv[2])
    die_with_parent(parent)
    # Its life is the proxy's: a signal to the proxy's process group (a drain's SIGTERM) is not
    # for it, while its downloads still have readers.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="regcache download worker: %(message)s")
    asyncio.run(serve(socket.socket(fileno=fd)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
