"""The data plane's start (objectstore/copies.py's remove_unfinished, before its workers): the
unsealed files of the copies folder no writer holds go, a dead worker's temporary names
included; sealed copies, the lock file and files a live writer holds stay."""

from __future__ import annotations

import fcntl
import os

from regcache_core.objectstore.copies import LOCK_FILE, remove_unfinished
from regcache_core.spool.table import WRITABLE


def test_unsealed_files_no_writer_holds_go_and_the_rest_stay(tmp_path):
    dead_copy = tmp_path / "sha256-aa"
    dead_copy.write_bytes(b"part of a blob")
    dead_temporary = tmp_path / ".sha256-bb.4242.0badcafe"  # a worker killed between open and link
    dead_temporary.write_bytes(b"")
    whole = tmp_path / "sha256-cc"
    whole.write_bytes(b"a whole blob")
    whole.chmod(whole.stat().st_mode & ~WRITABLE)  # sealed
    (tmp_path / LOCK_FILE).write_bytes(b"")
    live = tmp_path / "sha256-dd"
    with open(live, "wb") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)  # a writer at work (another data plane's worker)
        assert remove_unfinished(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE, "sha256-cc", "sha256-dd"]
    assert remove_unfinished(tmp_path / "missing") == 0
