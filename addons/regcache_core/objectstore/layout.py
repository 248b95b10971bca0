"""registry:2's layout of a storage root (stable since 2015), the same on a filesystem and in an
object store: a blob's bytes once per root, and a link per repository that may serve it."""

from __future__ import annotations

from ..routing import DIGEST, REPOSITORY


def blob_data(digest: str) -> str:
    """`docker/registry/v2/blobs/<algorithm>/<2 hex>/<hex>/data`: the blob's bytes."""
    algorithm, _, hex_digits = digest.partition(":")
    return f"docker/registry/v2/blobs/{algorithm}/{hex_digits[:2]}/{hex_digits}/data"


def layer_link(repository: str, digest: str) -> str:
    """`docker/registry/v2/repositories/<repository>/_layers/<algorithm>/<hex>/link`: holds the
    digest when `repository` may serve the blob (registry:2's rule)."""
    algorithm, _, hex_digits = digest.partition(":")
    return f"docker/registry/v2/repositories/{repository}/_layers/{algorithm}/{hex_digits}/link"


def valid(repository: str, digest: str) -> bool:
    """Both checked again here, not only by routing: they become parts of a path or a key."""
    return bool(DIGEST.fullmatch(digest) and REPOSITORY.fullmatch(repository))
