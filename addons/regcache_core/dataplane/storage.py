"""Where a cache keeps its blobs: registry:2's filesystem layout (stable since 2015).

This is the one function of the cache's storage the data plane needs; S3-compatible storage
(registry:2's presigned redirects are the same idea) will replace it.
"""

from __future__ import annotations

from pathlib import Path

from ..routing import DIGEST, REPOSITORY


def warm_blob(storage_root: Path, repository: str, digest: str) -> Path | None:
    """The blob's data file, when the cache holds it and `repository` may serve it.

    registry:2 keeps a blob's bytes once per storage, at
    `docker/registry/v2/blobs/<algorithm>/<2 hex>/<hex>/data`, and lets a repository serve it
    only when `docker/registry/v2/repositories/<repository>/_layers/<algorithm>/<hex>/link`
    holds its digest. Blocking (file system): call it in a thread from an event loop.
    """
    # Both checked again here, not only by routing: they become parts of a path.
    if not DIGEST.fullmatch(digest) or not REPOSITORY.fullmatch(repository):
        return None
    v2 = storage_root / "docker/registry/v2"
    algorithm, _, hex_digits = digest.partition(":")
    try:
        linked = (v2 / "repositories" / repository / "_layers" / algorithm / hex_digits / "link").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    data = v2 / "blobs" / algorithm / hex_digits[:2] / hex_digits / "data"
    return data if linked.strip() == digest and data.is_file() else None
