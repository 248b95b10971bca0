"""Pull records of the data plane, sent to the proxy, which logs and counts them with its own,
and the notices that the object store did not answer a worker (the proxy's health of the store
follows them: objectstore/health.py).

A unix datagram socket in the data dir (only its owner may use it): each record is one JSON
datagram, each notice a JSON object of one key, `store_down`, and why. The data plane never waits for the proxy: records queue in memory and a task sends
them; when the proxy is not there (or the queue is full) a record is dropped, counted, and
warned about once a minute. The socket is connected, so a sender waits for room in the
proxy's queue (the kernel holds only net.unix.max_dgram_qlen datagrams, often 10) instead of
losing records under a burst.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ..observe.pull_log import PullRecord, from_json, to_json

logger = logging.getLogger(__name__)

SOCKET_FILE = "dataplane-records.sock"
QUEUE_LIMIT = 10_000  # records waiting to be sent (a few MB at most)
WARN_EVERY = 60.0  # seconds between warnings about dropped records
NOTICE_EVERY = 1.0  # seconds between a worker's notices that the store is down: one says it, the rest repeat


def records_socket(data_dir: Path) -> Path:
    return data_dir / SOCKET_FILE


class RecordSender:
    """Queues records (call it with one) and sends them to the proxy from `run()`."""

    def __init__(self, path: Path, clock=time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self.queue: collections.deque[bytes] = collections.deque()
        self.dropped = 0  # since the last warning
        self._last_warning: float | None = None
        self._last_notice: float | None = None
        self._wake = asyncio.Event()
        self._socket: socket.socket | None = None

    def __call__(self, record: PullRecord) -> None:
        if len(self.queue) >= QUEUE_LIMIT:
            self._drop("the queue is full: the proxy does not take records as fast as they come")
            return
        self.queue.append(to_json(record).encode())
        self._wake.set()

    def store_down(self, reason: str) -> None:
        """Tell the proxy that the object store did not answer (`reason`), at most every NOTICE_EVERY."""
        now = self.clock()
        if self._last_notice is not None and now - self._last_notice < NOTICE_EVERY:
            return
        self._last_notice = now
        self.queue.append(json.dumps({"store_down": reason}).encode())
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queue:
                try:
                    await loop.sock_sendall(self._connected(), self.queue[0])
                except OSError as e:
                    self._close()
                    self._drop(f"the proxy does not receive them at {self.path}: {e.strerror or e}")
                self.queue.popleft()

    async def flush(self, timeout: float) -> None:
        """Wait until every queued record is sent (or `timeout` passes)."""
        deadline = self.clock() + timeout
        while self.queue and self.clock() < deadline:
            await asyncio.sleep(0.01)

    def _connected(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                raise
            self._socket = sock
        return self._socket

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        now = self.clock()
        if self._last_warning is None or now - self._last_warning >= WARN_EVERY:
            logger.warning("%d pull record(s) dropped: %s", self.dropped, reason)
            self.dropped, self._last_warning = 0, now


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, sink: Callable[[PullRecord], None], store_down: Callable[[str], None]) -> None:
        self.sink = sink
        self.store_down = store_down

    def datagram_received(self, data: bytes, addr) -> None:
        if (reason := _store_down_notice(data)) is not None:
            self.store_down(reason)
            return
        record = from_json(data)
        if record is None:
            logger.warning("ignored a datagram on the data plane's record socket that is no pull record")
            return
        self.sink(record)


def _store_down_notice(data: bytes) -> str | None:
    if not data.startswith(b'{"store_down"'):
        return None
    try:
        reason = json.loads(data).get("store_down")
    except ValueError:
        return None
    return reason if isinstance(reason, str) else None


async def receive_records(path: Path, sink: Callable[[PullRecord], None],
                          store_down: Callable[[str], None] = lambda _: None) -> asyncio.DatagramTransport:
    """Bind the record socket (replacing one a previous proxy left), hand each record to `sink`
    and each notice that the object store did not answer a worker to `store_down(reason)`."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.setblocking(False)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: _Receiver(sink, store_down), sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport
