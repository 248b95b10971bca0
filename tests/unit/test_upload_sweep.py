"""The sweep of partial uploads (budget/uploads.py) on a registry:2 layout written here (a FileTree:
the sweep sees an object store's the same way): an upload goes when its newest sign of life, its
files' times and the time its `startedat` holds, is older than the bound."""

from __future__ import annotations

import os
from datetime import datetime, timezone

from regcache_core.budget.storage import FileTree
from regcache_core.budget.uploads import MAX_AGE, age, started_at, sweep

NOW = 2_000_000_000.0
OLD, FRESH = NOW - MAX_AGE - 60, NOW - 60
UPLOADS = "docker/registry/v2/repositories/{}/_uploads"


def rfc3339(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # registry:2's format


def put(root, path: str, content: bytes, mtime: float) -> None:
    file = root / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(content)
    os.utime(file, (mtime, mtime))


def upload(root, repository: str, uuid: str, started: float, mtime: float, **files: float) -> str:
    folder = f"{UPLOADS.format(repository)}/{uuid}"
    put(root, f"{folder}/startedat", rfc3339(started).encode(), mtime)
    for name, when in files.items():
        put(root, f"{folder}/{name.replace('__', '/')}", b"x", when)
    return folder


def test_an_old_upload_goes_and_one_written_lately_stays(tmp_path):
    old = upload(tmp_path, "library/alpine", "a1", OLD, OLD, data=OLD, hashstates__sha256__0=OLD)
    started_long_ago_but_written = upload(tmp_path, "library/alpine", "b2", OLD, OLD, data=FRESH)
    just_started = upload(tmp_path, "some/nested/repo", "c3", FRESH, FRESH)
    put(tmp_path, "docker/registry/v2/repositories/library/alpine/_layers/sha256/ab/link", b"sha256:ab", OLD)
    assert sweep(FileTree(tmp_path), NOW) == [old]
    assert not (tmp_path / old).exists()
    assert (tmp_path / started_long_ago_but_written / "data").exists() and (tmp_path / just_started).exists()
    assert (tmp_path / "docker/registry/v2/repositories/library/alpine/_layers/sha256/ab/link").exists()


def test_startedat_counts_by_the_time_it_holds_not_when_the_file_was_written():
    # registry:2's clock is this machine's; the file's time is the store's.
    assert age({"startedat": FRESH}, OLD, NOW) == NOW - OLD
    assert age({"startedat": OLD}, FRESH, NOW) == NOW - FRESH
    assert age({"startedat": OLD, "data": FRESH}, OLD, NOW) == NOW - FRESH
    # unreadable: the file's own time
    assert age({"startedat": FRESH}, None, NOW) == NOW - FRESH
    assert started_at(b"garbage") is None and started_at(None) is None
    assert started_at(b"2026-12-06T20:00:00Z\n") == datetime(2026, 12, 6, 20, tzinfo=timezone.utc).timestamp()


def test_an_upload_without_startedat_and_an_emptied_folder_go_by_their_files_times(tmp_path):
    no_startedat = f"{UPLOADS.format('library/redis')}/d4"
    put(tmp_path, f"{no_startedat}/data", b"x", OLD)
    fresh_without = f"{UPLOADS.format('library/redis')}/e5"
    put(tmp_path, f"{fresh_without}/data", b"x", FRESH)
    assert sweep(FileTree(tmp_path), NOW) == [no_startedat]
    # A store lists an emptied folder as a key ending in "/" (SeaweedFS): it goes by its own time.
    marker = f"{UPLOADS.format('library/redis')}/f6"

    class Listing(FileTree):
        def files(self, under=""):
            yield from super().files(under)
            yield f"{marker}/", 0, OLD
    removed = []
    tree = Listing(tmp_path)
    tree.remove = removed.append
    assert sweep(tree, NOW) == [marker] and removed == [marker]
