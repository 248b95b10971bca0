"""Single-flight spools: one upstream fetch per cold blob, whatever asks.

registry:2 2.8 as a cache fetches every cold blob twice from its upstream (one GET streams to
the client, a background one stores), and once more for every client that asks while it is in
flight. So the first GET of a blob the cache does not hold, a client's (mitm/cold_blobs.py) or
one of the cache's on its egress listener (mitm/single_flight.py), starts a **download** that the
proxy owns (download.py): it goes upstream with our credentials and writes the blob's 200
body to a spool file. Every GET of the blob, the first included, waits until the download has its
answer's headers, then is sent to the data plane, which sends the spool file while it grows
(`SpoolProgress`, dataplane/spool_reader.py): clients directly, and the cache, asked to store the
blob, by its egress fetches. No requester leads: a client that goes away (a Ctrl-C on `docker
pull`) cuts only its own transfer, and the download goes on to the end for the others, and for
the pulls that come next. When the download got no body to spool (an error, a 404, the disk
bound reached), the GETs go to the cache and upstream as without spools.

Spools are keyed by (registry, repository, digest), not by digest alone: a follower in another
repository would get bytes the upstream never said that repository holds.

The spool file protocol between the proxy, its download worker (worker.py: the one writer, in
a process of its own) and the data-plane workers (readers, in other processes, sending the file
with sendfile: they never see the bytes):
- the proxy makes the file, empty, before any reader is sent to it; it only grows; a reader
  knows the blob's size and digest (its grant says) and stops at the size;
- the download worker hashes what it writes and tells the proxy the digest; once every byte is
  written and hashes to the blob's digest, the proxy makes the file read-only (`seal`), in place: its mode, read from the open file, is what tells
  a reader the bytes checked. A reader sends the bytes as they arrive but holds the last
  HOLD_BACK back until the file is sealed, so no client ever gets a whole body that the digest
  did not check;
- the proxy unlinks the file when the download fails (or its bytes hash wrong), so a reader
  waiting for more bytes that finds `st_nlink == 0` on a file that is not sealed knows the rest
  will never come, and cuts its connection: never a short body passed off as complete. A reader
  that sees no growth for STALL_TIMEOUT (the proxy died) cuts too. A reader that caught up
  looks for growth every READ_POLL, and is woken at once by the seal's chmod or the unlink
  (changes.py);
- a client's reader holds a shared lock (flock) on its open file, and the proxy asks the cache
  to store a complete spool (cache_fill.py) once no client's reader holds one, or READERS_WAIT
  seconds after it completed: registry:2 reads, hashes and writes the whole blob again, which
  on a busy machine slowed the clients' transfers it overlapped, and its copy can wait a few
  seconds (its fetch still comes well within LINGER, so it follows the spool);
- a completed spool lingers LINGER seconds after it completed or last got a follower
  (registry:2 commits the blob into its storage just after its own fetch ends, and requests in
  that window would otherwise go upstream again), then is removed. Spools left by an earlier
  run are removed at start. A spool that went is forgotten at once: the next GET of its blob
  starts a new one, whose file (of the same name) is made once the old one is unlinked.

The proxy's file operations (make, seal, unlink) run in one thread per spool (an executor of one
worker), so they keep their order and the event loop never blocks. Disk use is bounded: over
`max_disk`, a blob is not spooled and its GETs go upstream each.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .changes import watching

logger = logging.getLogger(__name__)

SPOOL_DIR = "spools"  # folder in the data dir
LINGER = 30.0  # seconds a completed spool stays after its last use
FOLLOW_WAIT = 60.0  # seconds a GET waits for the download's answer headers, then goes upstream itself
STALL_TIMEOUT = 60.0  # seconds a reader waits for a spool that does not grow, then cuts
READ_POLL = 0.02  # seconds between a reader's looks at a spool it has caught up with, for growth
HOLD_BACK = 1 << 20  # the last bytes a reader sends only once the spool is sealed
READERS_WAIT = 10.0  # seconds a complete spool's store by the cache waits for its clients' readers, at most
READERS_POLL = 0.1  # seconds between looks at whether clients still read a spool
WRITABLE = 0o222  # a sealed spool file has none of these mode bits

Key = tuple[str, str, str]  # registry name, repository, digest


class State(enum.Enum):
    WAITING = "waiting"  # the download has no answer yet
    SPOOLING = "spooling"
    COMPLETE = "complete"
    GONE = "gone"  # declined, failed or removed: GETs go upstream


class SpoolBroken(Exception):
    """A spool will never hold the whole blob, or holds other bytes: the reader must cut."""


def spool_path(directory: Path, key: Key) -> Path:
    """One file name per key, which the proxy and the data plane both derive. A spool of the same
    key made after a failed one may reuse it: its bytes are the same (and readers check them)."""
    return directory / hashlib.sha256("\0".join(key).encode()).hexdigest()


@dataclass(eq=False)
class Spool:
    """One blob's spool, from the first GET to its removal."""

    key: Key
    path: Path
    state: State = State.WAITING
    size: int = 0
    content_type: str = "application/octet-stream"  # as the upstream sent it
    decided: asyncio.Event = field(default_factory=asyncio.Event)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "regcache-spool"))
    file: SpoolFile | None = None
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task | None = None  # the download that writes it
    cache_asked: bool = False  # its cache was asked to store the blob (cache_fill.py)

    @property
    def servable(self) -> bool:
        return self.state in (State.SPOOLING, State.COMPLETE)


class SpoolFile:
    """The proxy's handle on a spool file that the download worker writes (download.py): made
    empty before any reader is sent to it, sealed or removed by the proxy (in the spool's thread)."""

    def __init__(self, spool: Spool, file) -> None:
        self.spool = spool
        self._file = file

    def seal(self) -> None:
        """Every byte is written and checked: make the file read-only, the mark readers wait for,
        and close it."""
        os.fchmod(self._file.fileno(), os.fstat(self._file.fileno()).st_mode & ~WRITABLE)
        self._file.close()

    def discard(self) -> None:
        """Close and unlink the file: readers that lack bytes then cut."""
        self._file.close()
        remove_file(self.spool.path)


class SpoolTable:
    """The spools of one proxy, by key. Lives on the proxy's event loop."""

    def __init__(self, directory: Path, max_disk: int, linger: float = LINGER, follow_wait: float = FOLLOW_WAIT,
                 keep: Callable[[Key, Path, int], None] | None = None) -> None:
        self.directory = directory
        self.max_disk = max_disk
        self.linger, self.follow_wait = linger, follow_wait
        # (key, path, size), in the spool's thread once it is sealed: may keep the file (a second
        # link to it: objectstore/copies.py's adopt) before the spool goes
        self.keep = keep
        self._spools: dict[Key, Spool] = {}
        # Key -> the unlink of its last spool's file, while under way: a new spool of the key makes
        # its file, of the same name, only after it (start).
        self._unlinking: dict[Key, asyncio.Future] = {}
        # Blocking, but once, at start, before any request: spools of an earlier run are useless.
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def disk_in_use(self) -> int:
        """Bytes of the spools, and of those starting: `start` reserves a size before its awaits."""
        return sum(s.size for s in self._spools.values() if s.state is not State.GONE)

    def claim(self, key: Key) -> tuple[Spool, bool]:
        """The spool of `key`, and whether it is new (the caller starts its download)."""
        spool = self._spools.get(key)
        if spool is not None:
            return spool, False
        spool = self._spools[key] = Spool(key, spool_path(self.directory, key))
        return spool, True

    async def follow(self, spool: Spool) -> bool:
        """Whether a GET can be served from `spool`, once its download has its answer's headers;
        False: it goes upstream itself (no spool, or no answer within follow_wait)."""
        if not spool.decided.is_set():
            try:
                await asyncio.wait_for(spool.decided.wait(), self.follow_wait)
            except asyncio.TimeoutError:
                return False
        self._linger_from_now(spool)
        return spool.servable

    def get(self, key: Key) -> Spool | None:
        """The spool of `key`, if there is one (in any state)."""
        return self._spools.get(key)

    async def start(self, spool: Spool, size: int | None, content_type: str | None) -> bool:
        """The download got a 200 of `size` bytes: its spool file, empty, made, and True; or False
        when it is not spooled (size unknown, over the disk bound, a digest hashlib does not
        know); GETs then go upstream."""
        if size is None or self.disk_in_use + size > self.max_disk:
            logger.info("not spooling %s (%s): fetches go upstream", describe(spool.key),
                        "no Content-Length" if size is None else f"{size} bytes, over REGCACHE_SPOOL_MAX_DISK")
            self.decline(spool)
            return False
        spool.size = size  # reserved: a download starting meanwhile sees it (declining drops it)
        if (unlinking := self._unlinking.get(spool.key)) is not None:
            await asyncio.wait([unlinking])  # it would unlink this spool's file instead
        try:
            hashlib.new(spool.key[2].partition(":")[0])
            file = await asyncio.get_running_loop().run_in_executor(spool.executor, open_for_writing, spool.path)
        except (OSError, ValueError) as e:
            logger.warning("not spooling %s: %s", describe(spool.key), e)
            self.decline(spool)
            return False
        spool.state = State.SPOOLING
        spool.content_type = content_type or spool.content_type
        spool.file = SpoolFile(spool, file)
        spool.decided.set()
        logger.info("spooling %s: %d bytes from upstream", describe(spool.key), size)
        return True

    async def finish(self, spool: Spool, received: int, digest: str) -> None:
        """The download's body ended, `received` bytes of it written, hashing to `digest`: a spool
        with every byte, hashing to its key's digest, is sealed and completes; else it fails."""
        if received != spool.size:
            self.fail(spool, f"{received} of {spool.size} bytes")
        elif digest != spool.key[2]:
            self.fail(spool, f"the bytes hash to {digest[:19]}")
        else:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(spool.executor, spool.file.seal)
            if self.keep is not None:
                try:
                    await loop.run_in_executor(spool.executor, self.keep, spool.key, spool.path, spool.size)
                except OSError as e:
                    logger.warning("could not keep the spool of %s: %s", describe(spool.key), e)
            if spool.state is State.SPOOLING:
                spool.state = State.COMPLETE
                logger.info("spooled %s: complete, %d bytes", describe(spool.key), spool.size)
                self._linger_from_now(spool)

    def decline(self, spool: Spool) -> None:
        """No spool for this blob (no body, or not spooled): waiting GETs go upstream."""
        if spool.state is State.WAITING:
            spool.state = State.GONE
            spool.decided.set()
            self._remove(spool)

    def fail(self, spool: Spool, reason: str) -> None:
        """The download failed: its file goes (readers of it cut), and GETs still to come go upstream."""
        if spool.state is State.GONE:
            return
        if spool.state is State.SPOOLING:
            logger.info("spool of %s failed (%s): its followers are cut", describe(spool.key), reason)
        spool.state = State.GONE
        spool.decided.set()
        self._remove(spool)

    def close(self) -> None:
        """Proxy shut-down: every download stops, every spool goes."""
        for spool in list(self._spools.values()):
            if spool.task is not None:
                spool.task.cancel()
            self.fail(spool, "regcache stops")

    def __len__(self) -> int:
        return len(self._spools)

    def _linger_from_now(self, spool: Spool) -> None:
        if spool.state is State.COMPLETE:
            self._cancel_timer(spool)
            spool.timer = asyncio.get_running_loop().call_later(self.linger, self._expire, spool)

    def _expire(self, spool: Spool) -> None:
        spool.state = State.GONE
        self._remove(spool)

    def _remove(self, spool: Spool) -> None:
        """Forget the key at once, so that the next GET of the blob starts a new spool (a GET in
        between going upstream itself would undo the single flight), and unlink the file (after a
        seal under way) in the spool's thread."""
        self._cancel_timer(spool)
        if self._spools.get(spool.key) is spool:
            del self._spools[spool.key]
        if spool.file is None:
            spool.executor.shutdown(wait=False)
            return
        unlinking = asyncio.wrap_future(spool.executor.submit(spool.file.discard))
        self._unlinking[spool.key] = unlinking
        unlinking.add_done_callback(lambda _: self._unlinked(spool, unlinking))

    def _unlinked(self, spool: Spool, unlinking: asyncio.Future) -> None:
        if self._unlinking.get(spool.key) is unlinking:
            del self._unlinking[spool.key]
        spool.executor.shutdown(wait=False)

    @staticmethod
    def _cancel_timer(spool: Spool) -> None:
        if spool.timer is not None:
            spool.timer.cancel()
            spool.timer = None


def open_for_writing(path: Path):
    """The spool file, empty, unbuffered, and writable whatever the umask: not sealed."""
    file = open(path, "wb", 0)
    os.fchmod(file.fileno(), 0o600)
    return file


def remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def hold_as_reader(fd: int) -> None:
    """A client's reader marks the spool file it has open (fd) until it closes it. Best effort:
    while the proxy looks (a moment), the mark is not taken, and the store need not wait for it."""
    with contextlib.suppress(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


def clients_reading(path: Path) -> bool:
    """Whether a client's reader holds the spool file at `path` open (blocking: call it in a thread)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and the lock with it
    return False


async def clients_done(spool: Spool, wait: float = READERS_WAIT) -> None:
    """Returns once no client's reader holds the spool's file, or after `wait` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while loop.time() < deadline and await asyncio.to_thread(clients_reading, spool.path):
        await asyncio.sleep(READERS_POLL)


def describe(key: Key) -> str:
    registry, repository, digest = key
    return f"{registry}/{repository}@{digest[:19]}"


def sealed(status: os.stat_result) -> bool:
    return status.st_mode & WRITABLE == 0


class SpoolProgress:
    """How far a reader of a spool file may send (see the module's docstring). The file's status
    is read from the open file (fstat: no disk access), on the reader's event loop. A reader that
    caught up looks again every `poll` seconds for growth, and at once when the file is sealed
    or unlinked (changes.py)."""

    def __init__(self, fd: int, size: int, stall_timeout: float = STALL_TIMEOUT, poll: float = READ_POLL) -> None:
        self.fd, self.size = fd, size
        self.stall_timeout, self.poll = stall_timeout, poll
        self.broken: str | None = None  # why the spool can never be sent whole, once that is known

    async def ready(self, offset: int) -> int:
        """The end of the bytes a reader that has sent `offset` of them may send now (more than
        `offset`), once the download has written them. Raises SpoolBroken when they will never
        all come, or hashed wrong."""
        if (end := self._end(os.fstat(self.fd))) > offset:
            return end  # a reader behind the download: no watch to set up
        loop = asyncio.get_running_loop()
        seen, idle_since = -1, loop.time()
        with watching(self.fd) as watch:
            while True:
                sealed_or_gone = watch.next_change() if watch is not None else None  # before the look
                status = os.fstat(self.fd)
                if (end := self._end(status)) > offset:
                    return end
                if status.st_nlink == 0 and not sealed(status):
                    self._break(f"the download failed after {status.st_size} of {self.size} bytes")
                if status.st_size != seen:
                    seen, idle_since = status.st_size, loop.time()
                elif loop.time() - idle_since > self.stall_timeout:
                    self._break(f"no growth for {self.stall_timeout:.0f}s after {status.st_size} of {self.size} bytes")
                if sealed_or_gone is None:
                    await asyncio.sleep(self.poll)
                else:
                    await asyncio.wait([sealed_or_gone], timeout=self.poll)

    def _end(self, status: os.stat_result) -> int:
        return self.size if sealed(status) else min(status.st_size, self.size - HOLD_BACK)

    def _break(self, reason: str) -> None:
        self.broken = reason
        raise SpoolBroken(reason)
