"""The proxy's side of the download worker (worker.py): starts it when an exchange first needs
it, sends it each exchange's requests and hands the exchange its events, in order.

The worker gets no credentials in its arguments or environment (only PATH, where Python finds
regcache, and where TLS finds its trusted certificates), only in the messages of its socket.
When it dies, whatever the cause, one warning names its exit status, every exchange it had gets
a `lost` event (a download's spool fails, so its readers cut), and the next exchange starts a
new worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from .worker import MESSAGE_LIMIT

logger = logging.getLogger(__name__)

ADDONS = Path(__file__).resolve().parents[2]  # where `regcache_core` is
PASSED_ENVIRONMENT = ("PATH", "SSL_CERT_FILE", "SSL_CERT_DIR")
EXIT_WAIT = 5.0  # seconds to wait for a worker whose socket closed to exit, for its status


class Exchange:
    """One exchange with the worker: a fetch, maybe its body's write. Close it when done: one not
    finished is dropped by the worker too."""

    def __init__(self, process: WorkerProcess, id: int) -> None:
        self.process, self.id = process, id
        self.events: asyncio.Queue[dict] = asyncio.Queue()

    def send(self, op: str, **fields) -> None:
        self.process.send({"op": op, "id": self.id, **fields})

    async def event(self) -> dict:
        return await self.events.get()

    def close(self) -> None:
        if self.process.exchanges.pop(self.id, None) is not None:
            self.send("drop")

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *_) -> None:
        self.close()


class WorkerProcess:
    """One worker process and its exchanges, by id."""

    def __init__(self, process: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.process, self.writer = process, writer
        self.exchanges: dict[int, Exchange] = {}
        self.closed = False  # by the proxy: its end says nothing
        self.reading = asyncio.get_running_loop().create_task(self._read(reader))

    @property
    def alive(self) -> bool:
        return not self.writer.is_closing()

    def send(self, message: dict) -> None:
        if self.alive:
            self.writer.write(json.dumps(message).encode() + b"\n")

    async def close(self) -> None:
        """Kill the worker and wait (EXIT_WAIT at most) until it has exited: a proxy that is
        stopping closes its event loop next, and asyncio warns on stderr about a child that
        outlives its loop."""
        self.closed = True
        if self.process.returncode is None:
            self.process.kill()
        self.writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_WAIT):
                await self.process.wait()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                event = json.loads(line)
                if (exchange := self.exchanges.get(event["id"])) is not None:
                    exchange.events.put_nowait(event)
        except (OSError, ValueError) as e:
            logger.warning("the download worker's messages failed (%s): stopping it", e)
            self.process.kill()
        self.writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_WAIT):
                await self.process.wait()
        lost = list(self.exchanges.values())
        self.exchanges.clear()
        if not self.closed:
            logger.warning("the download worker (pid %d) exited with status %s: its %d download(s) fail; the next one "
                           "starts a new worker", self.process.pid, self.process.returncode, len(lost))
        for exchange in lost:
            exchange.events.put_nowait({"id": exchange.id, "event": "lost",
                                        "reason": f"the download worker exited with status {self.process.returncode}"})


class WorkerLink:
    """The proxy's download worker, started when an exchange first needs it, and again after it died."""

    def __init__(self) -> None:
        self.worker: WorkerProcess | None = None
        self._ids = itertools.count(1)
        self._starting = asyncio.Lock()
        self._warming: asyncio.Task | None = None
        self._closed = False

    def start_soon(self) -> None:
        """Start the worker now, when there is a running event loop, so that the first cold
        download does not wait for Python to start."""
        with contextlib.suppress(RuntimeError):
            self._warming = asyncio.get_running_loop().create_task(self._started())  # kept: tasks are weakly held

    async def exchange(self, **fetch) -> Exchange:
        """A new exchange, its fetch sent (see worker.py for the fields)."""
        worker = await self._started()
        exchange = Exchange(worker, next(self._ids))
        worker.exchanges[exchange.id] = exchange
        exchange.send("fetch", **fetch)
        return exchange

    async def _started(self) -> WorkerProcess:
        async with self._starting:
            if self.worker is None or not self.worker.alive:
                self.worker = await start_worker()
                if self._closed:  # closed while it started
                    await self.worker.close()
            return self.worker

    async def close(self) -> None:
        """Stop the worker and wait for its exit; its exchanges are lost."""
        self._closed = True
        if self.worker is not None:
            await self.worker.close()


async def start_worker() -> WorkerProcess:
    ours, theirs = socket.socketpair()
    environment = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
    try:
        # The worker sets its parent-death signal itself (stack/parent_death.py): mitmproxy runs
        # threads, so no Python may run between fork and exec here.
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "regcache_core.spool.worker", str(os.getpid()), str(theirs.fileno()),
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            env={**environment, "PYTHONPATH": str(ADDONS)})
    finally:
        theirs.close()
    reader, writer = await asyncio.open_connection(sock=ours, limit=MESSAGE_LIMIT)
    return WorkerProcess(process, reader, writer)
