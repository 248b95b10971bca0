"""Single-flight spools: one upstream fetch per cold blob, whatever asks.

registry:2 2.8 as a cache fetches every cold blob twice from its upstream (one GET streams to
the client, a background one stores), and once more for every client that asks while it is in
flight. All of these reach the proxy's egress listener for that registry. There the first GET of
a blob is the leader: it goes upstream, and its 200 body is written to a spool file as it
passes. Every concurrent GET of the same blob is a follower: it waits until the leader has its
answer's headers, then is sent to the data plane, which streams the spool file while it grows
(`read_spool`, served by dataplane/spool_reader.py). When the leader got no body to spool (an
error, a 404, the disk bound reached), followers go upstream themselves, as without spools.

Spools are keyed by (registry, repository, digest), not by digest alone: a follower in another
repository would get bytes the upstream never said that repository holds.

The spool file protocol between the proxy (the one writer) and the data-plane workers (readers,
in other processes):
- the file only grows; a reader knows the blob's size and digest (its grant says) and stops at
  the size;
- the writer unlinks the file when the leader fails, so a reader that has fewer bytes than
  expected, sees no growth and finds `st_nlink == 0` knows the rest will never come, and cuts
  its connection: never a short body passed off as complete. A reader that sees no growth for
  STALL_TIMEOUT (the proxy died) cuts too;
- readers hash what they send, hold the last bytes back until the hash checks, and cut on a
  mismatch;
- a completed spool lingers LINGER seconds after it completed or last got a follower
  (registry:2 commits the blob into its storage just after its own fetch ends, and requests in
  that window would otherwise go upstream again), then is removed. Spools left by an earlier
  run are removed at start.

Writes run in one thread per spool (an executor of one worker), so they keep their order and
the event loop never blocks; the bytes pass on to the cache unchanged. Disk use is bounded:
over `max_disk`, a new leader does not spool and its followers go upstream.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

SPOOL_DIR = "spools"  # folder in the data dir
LINGER = 30.0  # seconds a completed spool stays after its last use
FOLLOW_WAIT = 60.0  # seconds a follower waits for the leader's answer headers, then goes upstream itself
HANDOVER_WAIT = 10.0  # seconds a leader's redirect (to a CDN) has to be followed before followers give up
STALL_TIMEOUT = 60.0  # seconds a reader waits for a spool that does not grow, then cuts
READ_POLL = 0.02  # seconds between a reader's looks at a spool it has caught up with
READ_CHUNK = 1 << 20

Key = tuple[str, str, str]  # registry name, repository, digest


class State(enum.Enum):
    WAITING = "waiting"  # the leader has no answer yet, or was redirected and its follow-up has not come
    SPOOLING = "spooling"
    COMPLETE = "complete"
    DECLINED = "declined"  # no spool: followers go upstream


class SpoolBroken(Exception):
    """A spool will never hold the whole blob, or holds other bytes: the reader must cut."""


def spool_path(directory: Path, key: Key) -> Path:
    """One file name per key, which the proxy and the data plane both derive. A spool of the same
    key made after a failed one may reuse it: its bytes are the same (and readers check them)."""
    return directory / hashlib.sha256("\0".join(key).encode()).hexdigest()


@dataclass(eq=False)
class Spool:
    """One blob's spool, from the leader's request to its removal."""

    key: Key
    path: Path
    state: State = State.WAITING
    size: int = 0
    handed_over: bool = False  # the leader was redirected: the follow-up of that redirect leads now
    decided: asyncio.Event = field(default_factory=asyncio.Event)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "regcache-spool"))
    writer: SpoolWriter | None = None
    timer: asyncio.TimerHandle | None = None

    @property
    def servable(self) -> bool:
        return self.state in (State.SPOOLING, State.COMPLETE)


class SpoolWriter:
    """A response stream (`chunk -> chunk`) that passes the leader's body on unchanged and
    appends it to the spool file, in the spool's own thread."""

    def __init__(self, spool: Spool, file) -> None:
        self.spool = spool
        self._file = file
        self.received = 0  # bytes passed on
        self.broken = False  # a write failed (disk full): the file is gone

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            self.received += len(chunk)
            self.spool.executor.submit(self._write, chunk)
        return chunk

    def _write(self, chunk: bytes) -> None:
        if self.broken:
            return
        try:
            self._file.write(chunk)
        except OSError as e:
            self.broken = True
            logger.warning("spool of %s: write failed (%s); its followers are cut", describe(self.spool.key), e)
            self.discard()

    def close(self) -> None:
        """In the spool's thread, after the writes queued before."""
        self._file.close()

    def discard(self) -> None:
        """Close and unlink the file: readers that lack bytes then cut (in the spool's thread)."""
        self._file.close()
        remove_file(self.spool.path)


class SpoolTable:
    """The spools of one proxy, by key. Lives on the proxy's event loop."""

    def __init__(self, directory: Path, max_disk: int, linger: float = LINGER, follow_wait: float = FOLLOW_WAIT,
                 handover_wait: float = HANDOVER_WAIT) -> None:
        self.directory = directory
        self.max_disk = max_disk
        self.linger, self.follow_wait, self.handover_wait = linger, follow_wait, handover_wait
        self._spools: dict[Key, Spool] = {}
        self._tasks: set[asyncio.Task] = set()
        # Blocking, but once, at start, before any request: spools of an earlier run are useless.
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def disk_in_use(self) -> int:
        return sum(s.size for s in self._spools.values() if s.servable)

    async def claim(self, key: Key) -> tuple[str, Spool | None]:
        """What an egress GET of a blob is: ("leader", spool) goes upstream and spools; ("follower",
        spool) is served from the spool; ("upstream", None) goes upstream without a spool."""
        spool = self._spools.get(key)
        if spool is None:
            spool = self._spools[key] = Spool(key, spool_path(self.directory, key))
            return "leader", spool
        if not spool.decided.is_set():
            try:
                await asyncio.wait_for(spool.decided.wait(), self.follow_wait)
            except asyncio.TimeoutError:
                return "upstream", None
        if spool.servable:
            self._linger_from_now(spool)
            return "follower", spool
        return "upstream", None

    def take_over(self, key: Key) -> Spool | None:
        """The spool whose leader was redirected, for the follow-up of that redirect to lead."""
        spool = self._spools.get(key)
        if spool is None or not spool.handed_over:
            return None
        spool.handed_over = False
        self._cancel_timer(spool)
        return spool

    def redirected(self, spool: Spool) -> None:
        """The leader's answer is a redirect we follow: its follow-up leads from here."""
        spool.handed_over = True
        spool.timer = asyncio.get_running_loop().call_later(self.handover_wait, self.decline, spool)

    async def start(self, spool: Spool, size: int | None) -> SpoolWriter | None:
        """The leader got a 200 of `size` bytes: a writer for its stream, or None when it is not
        spooled (size unknown, or over the disk bound); followers then go upstream."""
        if size is None or self.disk_in_use + size > self.max_disk:
            logger.info("not spooling %s (%s): followers go upstream", describe(spool.key),
                        "no Content-Length" if size is None else f"{size} bytes, over REGCACHE_SPOOL_MAX_DISK")
            self.decline(spool)
            return None
        try:
            file = await asyncio.get_running_loop().run_in_executor(spool.executor, open, spool.path, "wb", 0)
        except OSError as e:
            logger.warning("not spooling %s: %s", describe(spool.key), e)
            self.decline(spool)
            return None
        spool.size, spool.state = size, State.SPOOLING
        spool.writer = SpoolWriter(spool, file)
        spool.decided.set()
        logger.info("spooling %s: %d bytes from upstream", describe(spool.key), size)
        return spool.writer

    async def finish(self, spool: Spool) -> None:
        """The leader's answer ended: a spool with every byte completes, else it fails."""
        writer = spool.writer
        if writer is None:
            self.decline(spool)
            return
        await asyncio.get_running_loop().run_in_executor(spool.executor, writer.close)
        if writer.broken or writer.received != spool.size:
            self.fail(spool, f"{writer.received} of {spool.size} bytes")
            return
        spool.state = State.COMPLETE
        logger.info("spooled %s: complete, %d bytes", describe(spool.key), spool.size)
        self._linger_from_now(spool)

    def decline(self, spool: Spool) -> None:
        """No spool for this leader (no body, or not spooled): waiting followers go upstream."""
        if spool.state is State.WAITING:
            spool.state = State.DECLINED
            spool.decided.set()
            self._remove(spool)

    def fail(self, spool: Spool, reason: str) -> None:
        """The leader failed: its file goes (readers of it cut), and followers still to come go upstream."""
        if spool.state is State.SPOOLING:
            logger.info("spool of %s failed (%s): its followers are cut", describe(spool.key), reason)
        spool.state = State.DECLINED
        spool.decided.set()
        self._remove(spool)

    def close(self) -> None:
        """Proxy shut-down: every spool goes."""
        for spool in list(self._spools.values()):
            self.fail(spool, "regcache stops")

    def __len__(self) -> int:
        return len(self._spools)

    def _linger_from_now(self, spool: Spool) -> None:
        if spool.state is State.COMPLETE:
            self._cancel_timer(spool)
            spool.timer = asyncio.get_running_loop().call_later(self.linger, self._remove, spool)

    def _remove(self, spool: Spool) -> None:
        """Unlink the file after the writes queued before, then forget the key: until then a new
        leader of it would share the file name."""
        self._cancel_timer(spool)
        if spool.writer is None:
            self._forget(spool)
            return
        future = asyncio.wrap_future(spool.executor.submit(spool.writer.discard))
        future.add_done_callback(lambda _: self._forget(spool))

    def _forget(self, spool: Spool) -> None:
        if self._spools.get(spool.key) is spool:
            del self._spools[spool.key]
        spool.executor.shutdown(wait=False)

    @staticmethod
    def _cancel_timer(spool: Spool) -> None:
        if spool.timer is not None:
            spool.timer.cancel()
            spool.timer = None


def remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def describe(key: Key) -> str:
    registry, repository, digest = key
    return f"{registry}/{repository}@{digest[:19]}"


async def open_spool(path: Path) -> int:
    """A file descriptor of the spool, for read_spool (close it with os.close); FileNotFoundError
    when there is none (never made, or removed after it lingered)."""
    return await asyncio.get_running_loop().run_in_executor(None, os.open, path, os.O_RDONLY)


async def read_spool(fd: int, size: int, digest: str, stall_timeout: float = STALL_TIMEOUT,
                     poll: float = READ_POLL) -> AsyncIterator[bytes]:
    """The blob's bytes from its spool as they arrive, `size` in all, the last only once they hash
    to `digest`. Raises SpoolBroken when that can never be (see the module's docstring). File
    reads and hashing run in threads."""
    loop = asyncio.get_running_loop()
    algorithm, _, expected = digest.partition(":")
    hasher = hashlib.new(algorithm)
    offset, idle_since = 0, loop.time()
    while offset < size:
        chunk, linked = await loop.run_in_executor(None, _read_next, fd, offset, min(READ_CHUNK, size - offset), hasher)
        if chunk:
            offset += len(chunk)
            idle_since = loop.time()
            if offset == size and hasher.hexdigest() != expected:
                raise SpoolBroken(f"the spooled bytes hash to {algorithm}:{hasher.hexdigest()[:12]}, not {digest[:19]}")
            yield chunk
        elif not linked:
            raise SpoolBroken(f"the leader failed after {offset} of {size} bytes")
        elif loop.time() - idle_since > stall_timeout:
            raise SpoolBroken(f"no growth for {stall_timeout:.0f}s after {offset} of {size} bytes")
        else:
            await asyncio.sleep(poll)


def _read_next(fd: int, offset: int, count: int, hasher) -> tuple[bytes, bool]:
    """(bytes at offset, hashed), or (b"", whether the file is still linked). A file that was
    unlinked is read once more: bytes written before the unlink still count."""
    chunk = os.pread(fd, count, offset)
    if not chunk:
        if os.fstat(fd).st_nlink > 0:
            return b"", True
        chunk = os.pread(fd, count, offset)
        if not chunk:
            return b"", False
    hasher.update(chunk)
    return chunk, True
