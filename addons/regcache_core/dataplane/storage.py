"""Where a cache on a filesystem keeps its blobs: registry:2's layout (objectstore/layout.py)
under its storage root. A cache on an object store is read by objectstore/blobs.py instead."""

from __future__ import annotations

from pathlib import Path

from ..objectstore import layout


def warm_blob(storage_root: Path, repository: str, digest: str) -> Path | None:
    """The blob's data file, when the cache holds it and `repository` may serve it (its link
    holds the digest). Blocking (file system): call it in a thread from an event loop."""
    if not layout.valid(repository, digest):
        return None
    try:
        linked = (storage_root / layout.layer_link(repository, digest)).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    data = storage_root / layout.blob_data(digest)
    return data if linked.strip() == digest and data.is_file() else None
