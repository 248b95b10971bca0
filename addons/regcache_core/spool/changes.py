"""Waking a spool's readers at once when its file is sealed or unlinked (Linux inotify).

A reader that has caught up with a download (table.py's SpoolProgress) looks at the file every
READ_POLL (20 ms) for growth, but the end of a transfer should not wait for a look: the last
MiB, held back until the proxy seals the spool (a chmod), and the news that a failed download's
file was unlinked (its link count) both come as IN_ATTRIB. Growth (IN_MODIFY, one per MiB
written) is not watched: readers woken at each write (sending at 4 MiB) cost the data plane
about 1.0 CPU s per cold GiB instead of 0.75 with 1 client, 3.5 instead of 2.9 with 8 (a 512 MiB
blob on loopback), and on 2 busy cores that CPU is the clients' time.

One inotify instance per event loop (a data-plane worker), read on the loop; a watch per file
inode, shared by the readers of that file in the process (the kernel gives them one watch
descriptor) and counted, so the last one's wait removes it. A watch is held only while a reader
waits: a reader that goes away mid-transfer leaves nothing behind. Where inotify is not there
or out of instances or watches, readers find the seal or the unlink at their next look.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
import weakref
from collections.abc import Iterator

logger = logging.getLogger(__name__)

IN_ATTRIB, IN_Q_OVERFLOW = 0x4, 0x4000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name: none for a file's own watch)
READ_SIZE = 64 << 10

_libc = ctypes.CDLL(None, use_errno=True)


class FileChanges:
    """The inotify instance of one event loop: futures done at the next change of a watched file."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.fd = fd
        self.watchers: dict[int, int] = {}  # watch descriptor -> waits holding it
        self.waiting: dict[int, set[asyncio.Future]] = {}  # watch descriptor -> futures of its next change
        weakref.finalize(self, os.close, fd)
        loop.add_reader(fd, self._read)

    def watch(self, fd: int) -> int | None:
        """A watch on the open file `fd` (by its inode, unlinked or not), or None when none can be had."""
        wd = _libc.inotify_add_watch(self.fd, f"/proc/self/fd/{fd}".encode(), IN_ATTRIB)
        if wd < 0:
            logger.debug("no inotify watch (%s): a spool reader finds a seal or unlink at its next look",
                         os.strerror(ctypes.get_errno()))
            return None
        self.watchers[wd] = self.watchers.get(wd, 0) + 1
        return wd

    def unwatch(self, wd: int) -> None:
        self.watchers[wd] -= 1
        if not self.watchers[wd]:
            del self.watchers[wd]
            _libc.inotify_rm_watch(self.fd, wd)  # fails harmlessly when the inode is gone already

    def _read(self) -> None:
        changed: set[int] = set()
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.fd, READ_SIZE):
                offset = 0
                while offset < len(data):
                    wd, mask, _, length = EVENT.unpack_from(data, offset)
                    offset += EVENT.size + length
                    changed.update(self.waiting if mask & IN_Q_OVERFLOW else (wd,))
        for wd in changed:
            for future in self.waiting.pop(wd, ()):
                if not future.done():
                    future.set_result(None)


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FileChanges | None] = weakref.WeakKeyDictionary()


def _changes() -> FileChanges | None:
    loop = asyncio.get_running_loop()
    if loop not in _per_loop:
        try:
            _per_loop[loop] = FileChanges(loop)
        except (OSError, AttributeError) as e:  # no inotify here (AttributeError: not Linux's libc)
            logger.info("no inotify (%s): spool readers find a seal or unlink at their next look",
                        getattr(e, "strerror", None) or e)
            _per_loop[loop] = None
    return _per_loop[loop]


class Watch:
    """One reader's watch on a file, while it waits for the file to change."""

    def __init__(self, changes: FileChanges, wd: int) -> None:
        self.changes, self.wd = changes, wd
        self.future: asyncio.Future | None = None

    def next_change(self) -> asyncio.Future:
        """A future done at the file's next change after this call: look at the file after it,
        then wait, and a change in between is not missed."""
        self._forget_future()
        self.future = asyncio.get_running_loop().create_future()
        self.changes.waiting.setdefault(self.wd, set()).add(self.future)
        return self.future

    def _forget_future(self) -> None:
        if self.future is not None and (waiting := self.changes.waiting.get(self.wd)) is not None:
            waiting.discard(self.future)
            if not waiting:
                del self.changes.waiting[self.wd]
        self.future = None


@contextlib.contextmanager
def watching(fd: int) -> Iterator[Watch | None]:
    """A watch on the open file `fd` (its mode changing, its unlinking) for the block; None where
    inotify cannot watch it."""
    changes = _changes()
    wd = changes.watch(fd) if changes is not None else None
    if wd is None:
        yield None
        return
    watch = Watch(changes, wd)
    try:
        yield watch
    finally:
        watch._forget_future()
        changes.unwatch(wd)
