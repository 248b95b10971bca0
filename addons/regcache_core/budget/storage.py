"""What a registry:2 cache's storage holds, read from its filesystem layout (stable since 2015):

    docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data        the bytes of every blob and manifest
    docker/registry/v2/repositories/<name>/_layers/sha256/<hex>/link            repository may serve blob
    docker/registry/v2/repositories/<name>/_manifests/revisions/sha256/<hex>/link   ... manifest
    docker/registry/v2/repositories/<name>/_manifests/tags/<tag>/current/link   tag -> digest
    docker/registry/v2/repositories/<name>/_uploads/...                          writes in progress
    scheduler-state.json                                       the proxy's TTL scheduler

A repository name may have several components, so repositories are found by their
`_layers`/`_manifests` folders. Files vanish while we look (registry:2's TTL expiry, our own
eviction): a scan skips what is gone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

V2 = Path("docker/registry/v2")
MAX_MANIFEST = 4 << 20  # registry:2 refuses bigger manifests; a bigger data file is a layer


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    mtime: float  # when registry:2 stored it


@dataclass
class Repository:
    name: str
    layers: set[str] = field(default_factory=set)  # digests it links as blobs
    manifests: set[str] = field(default_factory=set)  # digests it links as manifest revisions
    tags: dict[str, str] = field(default_factory=dict)  # tag -> manifest digest


@dataclass
class Storage:
    root: Path
    blobs: dict[str, Blob]
    repositories: dict[str, Repository]
    total: int  # bytes of every file under root: blobs, uploads in progress, scheduler state

    def blob_path(self, digest: str) -> Path:
        return blob_dir(self.root, digest) / "data"

    def references(self, manifest: str) -> set[str]:
        """The digests a stored manifest names: config and layers, or an index's manifests."""
        return manifest_references(self.blob_path(manifest))

    def bytes_of(self, repository: Repository) -> int:
        """Bytes of the blobs and manifests a repository links (shared ones count in each)."""
        digests = repository.layers | repository.manifests
        return sum(self.blobs[d].size for d in digests if d in self.blobs)


def blob_dir(root: Path, digest: str) -> Path:
    algorithm, hex_digest = digest.split(":", 1)
    return root / V2 / "blobs" / algorithm / hex_digest[:2] / hex_digest


def scan(root: Path) -> Storage:
    return Storage(root, _blobs(root / V2 / "blobs"), _repositories(root / V2 / "repositories"), _total_bytes(root))


def manifest_references(path: Path) -> set[str]:
    try:
        if path.stat().st_size > MAX_MANIFEST:
            return set()
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return set()
    if not isinstance(document, dict):
        return set()
    described = [document.get("config"), *(document.get("layers") or []), *(document.get("manifests") or [])]
    return {d["digest"] for d in described if isinstance(d, dict) and isinstance(d.get("digest"), str)}


def _blobs(blobs: Path) -> dict[str, Blob]:
    found = {}
    for data in blobs.glob("*/*/*/data"):
        try:
            stat = data.stat()
        except OSError:
            continue
        digest = f"{data.parent.parent.parent.name}:{data.parent.name}"
        found[digest] = Blob(digest, stat.st_size, stat.st_mtime)
    return found


def _repositories(top: Path) -> dict[str, Repository]:
    found = {}
    for folder, subfolders, _ in os.walk(top):
        if "_layers" not in subfolders and "_manifests" not in subfolders:
            continue
        path = Path(folder)
        repository = Repository(path.relative_to(top).as_posix())
        repository.layers = _linked(path / "_layers")
        repository.manifests = _linked(path / "_manifests" / "revisions")
        for current in (path / "_manifests" / "tags").glob("*/current/link"):
            if digest := _read_link(current):
                repository.tags[current.parent.parent.name] = digest
        found[repository.name] = repository
        subfolders[:] = [s for s in subfolders if not s.startswith("_")]  # nested repositories only
    return found


def _linked(folder: Path) -> set[str]:
    """Digests of the `<algorithm>/<hex>/link` files under folder."""
    return {f"{link.parent.parent.name}:{link.parent.name}" for link in folder.glob("*/*/link")}


def _read_link(link: Path) -> str | None:
    try:
        return link.read_text().strip() or None
    except OSError:
        return None


def _total_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total
