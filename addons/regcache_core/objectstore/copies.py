"""The data plane's local copies of warm blobs of an object store (REGCACHE_S3_COPIES_MAX_DISK):
a whole GET of a blob that has no copy reads the object from the store once, into a copy file,
and is sent that file as it grows; every GET of the blob meanwhile, in any worker process,
follows the same file (one read from the store, however many clients), and later GETs, Range
included, are sent the copy by sendfile. The store is still asked, for each GET, whether it holds
the blob for the repository asked (objectstore/blobs.py's `warm`): a copy is never served for a
blob the cache no longer holds.

One file per digest in the copies folder (in the data dir), shared by the workers:
- a copy is written by one worker: it makes the file under a temporary name, takes an exclusive
  `flock` on it, then links it to the digest's name (an atomic step that fails when another
  worker got there first: this one then follows that one's file). The lock lives as long as the
  writer: a reader that finds a file still being written and can lock it knows its writer died,
  and removes it;
- the writer hashes what it writes; once every byte is written and hashes to the digest, it
  makes the file read-only (`seal`, the spools' mark: spool/table.py), else it unlinks it, so
  readers cut their connections. Readers hold the last bytes back until the file is sealed
  (SpoolProgress), so a copy's whole body is never sent unless the digest checked it;
- disk use is bounded: before a copy starts, the least recently served sealed copies go until the
  new one fits (under a lock file, so workers never evict at once); a blob larger than the
  bound gets no copy and streams from the store;
- a cold blob's spool, once sealed (its bytes checked: spool/table.py), becomes its copy by a
  second link to the same file (`adopt`, from the proxy): the blob's first warm GET needs no
  read from the store either.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..config import Config
from ..hashed_file import HashedFile
from ..http_body import BUFFERS
from ..spool.table import WRITABLE, Key, SpoolProgress, sealed
from .client import StoreUnreachable

logger = logging.getLogger(__name__)

COPIES_DIR = "object-copies"  # folder in the data dir
LOCK_FILE = ".lock"
PIECES_IN_FLIGHT = BUFFERS - 1  # pieces of the store's read being written and hashed at once: one buffer fills


@dataclass
class Copy:
    """A copy open for sending: whole (sealed) when `progress` is None, else being written."""

    file: BinaryIO
    progress: SpoolProgress | None


class LocalCopies:
    """One worker's side of the copies folder."""

    def __init__(self, directory: Path, max_disk: int, on_unreachable: Callable[[str], None] = lambda _: None) -> None:
        self.directory = directory
        self.max_disk = max_disk
        self.on_unreachable = on_unreachable  # (reason): the store did not answer a copy's read
        self._deciding = asyncio.Lock()  # one look-or-start at a time in this process
        self._writing: set[asyncio.Task] = set()  # tasks are weakly held
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def open(self, digest: str, size: int, read: Callable[[int], AsyncIterator[bytes]], start: bool) -> Copy | None:
        """The copy of the blob `digest` of `size` bytes, open: sealed, or being written (by this
        or another worker). With none, and `start`, one is started, its bytes from `read(held)`
        (the whole object, in pieces each valid until `held` more are asked for); None when there
        is none and none is started (not `start`, or it would not fit): the caller streams from
        the store."""
        async with self._deciding:
            found = await asyncio.to_thread(self._look, digest, size)
            if found is not None or not start or size > self.max_disk:
                return found
            started = await asyncio.to_thread(self._start, digest, size)
            if started is None:
                return await asyncio.to_thread(self._look, digest, size)  # another worker's, or none: no room
        writer, reader = started
        task = asyncio.get_running_loop().create_task(self._write(digest, size, writer, read))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
        return Copy(reader, SpoolProgress(reader.fileno(), size))

    async def close(self) -> None:
        """Worker shut-down: copies being written are abandoned (unlinked)."""
        for task in list(self._writing):
            task.cancel()
        await asyncio.gather(*self._writing, return_exceptions=True)

    def _path(self, digest: str) -> Path:
        return self.directory / copy_name(digest)

    def _look(self, digest: str, size: int) -> Copy | None:
        path = self._path(digest)
        try:
            file = open(path, "rb")
        except FileNotFoundError:
            return None
        status = os.fstat(file.fileno())
        if sealed(status):
            if status.st_size == size:
                os.utime(path)  # served now: the last to go
                return Copy(file, None)
            file.close()
            _unlink_if_same(path, status)  # not this blob's size: never sent
            return None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return Copy(file, SpoolProgress(file.fileno(), size))  # its writer is at work
        logger.warning("removed an unfinished copy of %s: its writer is gone", digest[:19])
        _unlink_if_same(path, status)
        file.close()
        return None

    def _start(self, digest: str, size: int) -> tuple[BinaryIO, BinaryIO] | None:
        """A new copy's file, locked and linked to its name: (for writing, for reading); None
        when another worker started one first, or the copies in use leave no room."""
        path = self._path(digest)
        with _copies_lock(self.directory):
            if not _make_room(self.directory, self.max_disk, size):
                logger.warning("no local copy of %s (%d bytes): copies being written hold REGCACHE_S3_COPIES_MAX_DISK",
                               digest[:19], size)
                return None
            temporary = self.directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
            writer = open(temporary, "xb", 0)
            try:
                os.fchmod(writer.fileno(), 0o600)
                fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
                try:
                    os.link(temporary, path)
                except FileExistsError:
                    writer.close()
                    return None
                return writer, open(path, "rb")
            finally:
                temporary.unlink()

    async def _write(self, digest: str, size: int, writer: BinaryIO,
                     read: Callable[[int], AsyncIterator[bytes | memoryview]]) -> None:
        # Each piece is written and hashed on threads of this copy's own (hashed_file.py: in
        # order; readers get bytes as soon as they are written), while the next pieces arrive
        # (body.py: into the other buffers) and are handed over too: up to PIECES_IN_FLIGHT at
        # once. Measured (256 MiB from SeaweedFS, one client): awaiting each piece's write and
        # hash before asking for the next (the loop's pool) spent 2.5-4 ms per MiB, 1 of them
        # working; the threads waited for the loop's hops in between.
        file = HashedFile(writer.fileno(), digest.partition(":")[0], "regcache-copy")
        in_flight: collections.deque[asyncio.Future] = collections.deque()
        written = 0
        try:
            async for piece in read(PIECES_IN_FLIGHT):
                in_flight.append(file.submit(piece))
                written += len(piece)
                if len(in_flight) == PIECES_IN_FLIGHT:
                    await in_flight.popleft()  # its buffer is filled again once the next piece is asked for
            await asyncio.gather(*in_flight)
            if written != size:
                raise OSError(f"the object ended after {written} of {size} bytes")
            if (hashed := file.digest()) != digest:
                raise OSError(f"the object's bytes hash to {hashed[:19]}, not to its digest")
            await asyncio.to_thread(_seal, writer)
        except BaseException as e:
            if isinstance(e, StoreUnreachable):
                self.on_unreachable(str(e))
            if not isinstance(e, asyncio.CancelledError):
                logger.warning("the local copy of %s failed: %s", digest[:19], e or type(e).__name__)
            await asyncio.gather(*in_flight, return_exceptions=True)
            await file.close(lambda: _discard(writer, self._path(digest)))
            if not isinstance(e, Exception):
                raise
        else:
            await file.close(writer.close)  # and the lock goes


def spool_keeper(config: Config) -> Callable[[Key, Path, int], None] | None:
    """For the proxy's SpoolTable: keeps each sealed spool of a cache on an object store as the
    blob's copy; None when there are no copies to make."""
    on_store = {r.name for r in config.registries if r.object_store is not None}
    if not config.s3.copies_max_disk or not on_store:
        return None
    directory = config.data_dir / COPIES_DIR

    def keep(key: Key, path: Path, size: int) -> None:
        if key[0] in on_store:
            adopt(directory, config.s3.copies_max_disk, path, key[2], size)
    return keep


def adopt(directory: Path, max_disk: int, sealed_file: Path, digest: str, size: int) -> bool:
    """Keep a sealed spool of a blob (spool/table.py: every byte there, hashing to `digest`) as its
    copy, by a second link to the same file (no byte copied), when the blob has none and it fits.
    Whether it did. Blocking: for the spool's own thread."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _copies_lock(directory):
        if not _make_room(directory, max_disk, size):
            return False
        try:
            os.link(sealed_file, directory / copy_name(digest))
        except FileExistsError:
            return False
    return True


def copy_name(digest: str) -> str:
    """The file name of a blob's copy: `sha256-<hex>`."""
    return digest.replace(":", "-")


@contextlib.contextmanager
def _copies_lock(directory: Path) -> Iterator[None]:
    """Held while copies are removed to make room and a new one is made: one process at a time."""
    with open(directory / LOCK_FILE, "ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def _make_room(directory: Path, max_disk: int, size: int) -> bool:
    """Remove the least recently served sealed copies until `size` more bytes fit; False when
    they cannot (copies being written hold the rest). Under the lock file."""
    if size > max_disk:
        return False
    copies = []
    for entry in os.scandir(directory):
        if entry.name != LOCK_FILE and entry.is_file(follow_symlinks=False):
            copies.append((entry.stat(follow_symlinks=False), entry.path))
    in_use = sum(status.st_size for status, _ in copies)
    for status, path in sorted((c for c in copies if sealed(c[0])), key=lambda c: c[0].st_mtime):
        if in_use + size <= max_disk:
            break
        _unlink_if_same(Path(path), status)
        in_use -= status.st_size
    return in_use + size <= max_disk


def _seal(writer: BinaryIO) -> None:
    os.fchmod(writer.fileno(), os.fstat(writer.fileno()).st_mode & ~WRITABLE)


def _discard(writer: BinaryIO, path: Path) -> None:
    _unlink_if_same(path, os.fstat(writer.fileno()))
    writer.close()


def _unlink_if_same(path: Path, status: os.stat_result) -> None:
    """Unlink `path` when it is still the file `status` describes (not a copy made since)."""
    try:
        if os.stat(path).st_ino == status.st_ino:
            path.unlink()
    except FileNotFoundError:
        pass


def remove_unfinished(directory: Path) -> int:
    """At the data plane's start, before its workers: remove the unsealed files of the copies
    folder no writer holds (the lock lives as long as its writer): copies and temporary names
    (`.sha256-<hex>.<pid>.<hex>`) left by a worker that died writing. A copy would otherwise be
    removed only by the next GET of its blob, and a temporary file never, holding room meanwhile.
    Returns how many went. Blocking."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.name == LOCK_FILE or not entry.is_file(follow_symlinks=False) or sealed(entry.stat()):
                continue
            file = open(entry.path, "rb")
        except FileNotFoundError:
            continue
        with file:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is at work
            _unlink_if_same(Path(entry.path), os.fstat(file.fileno()))
            removed += 1
    return removed
