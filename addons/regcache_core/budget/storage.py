"""What a registry:2 cache's storage holds, read from its layout (stable since 2015), on a
filesystem or in an object store alike (a Tree of files):

    docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data        the bytes of every blob and manifest
    docker/registry/v2/repositories/<name>/_layers/sha256/<hex>/link            repository may serve blob
    docker/registry/v2/repositories/<name>/_manifests/revisions/sha256/<hex>/link   ... manifest
    docker/registry/v2/repositories/<name>/_manifests/tags/<tag>/current/link   tag -> digest
    docker/registry/v2/repositories/<name>/_uploads/...                          writes in progress
    scheduler-state.json                                       the proxy's TTL scheduler

A repository name may have several components, so repositories are found by their
`_layers`/`_manifests` parts. Files vanish while we look (registry:2's TTL expiry, our own
eviction): a scan skips what is gone. A repository with no file left is no repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..objectstore import layout

V2 = Path("docker/registry/v2")
MAX_MANIFEST = 4 << 20  # registry:2 refuses bigger manifests; a bigger data file is a layer
MAX_LINK = 512  # a link holds one digest
_BLOB = re.compile(r"docker/registry/v2/blobs/([a-z0-9]+)/[0-9a-f]{2}/([0-9a-f]+)/data")
_REPOSITORY_FILE = re.compile(r"docker/registry/v2/repositories/(.+?)/(_layers|_manifests)/(.+)")
_LINK = re.compile(r"([a-z0-9]+)/([0-9a-f]+)/link")
_TAG = re.compile(r"tags/([^/]+)/current/link")


class Tree(Protocol):
    """A cache's storage root: its files by path under the root (`a/b/c`, no leading slash).
    Blocking calls: the disk budget runs them in its own thread."""

    def files(self, under: str = "") -> Iterator[tuple[str, int, float]]:
        """(path, size, modification time) of every file (whose path starts with `under`, a folder
        ending in `/`)."""

    def read(self, path: str, limit: int) -> bytes | None:
        """Up to `limit` bytes of a file; None when it is gone."""

    def remove(self, path: str) -> None:
        """The file at `path`, or every file under `path/`; what is gone already is no error."""


class FileTree:
    def __init__(self, root: Path) -> None:
        self.root = root

    def files(self, under: str = "") -> Iterator[tuple[str, int, float]]:
        for folder, _, names in os.walk(self.root / under):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    stat = os.lstat(path)
                except OSError:
                    continue
                yield Path(path).relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime

    def read(self, path: str, limit: int) -> bytes | None:
        try:
            with open(self.root / path, "rb") as file:
                return file.read(limit)
        except OSError:
            return None

    def remove(self, path: str) -> None:
        target = self.root / path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def __str__(self) -> str:
        return str(self.root)


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
    tree: Tree
    blobs: dict[str, Blob]
    repositories: dict[str, Repository]
    total: int  # bytes of every file under root: blobs, uploads in progress, scheduler state

    def references(self, manifest: str) -> set[str]:
        """The digests a stored manifest names: config and layers, or an index's manifests."""
        blob = self.blobs.get(manifest)
        if blob is None or blob.size > MAX_MANIFEST:
            return set()
        return manifest_references(self.tree.read(layout.blob_data(manifest), MAX_MANIFEST))

    def bytes_of(self, repository: Repository) -> int:
        """Bytes of the blobs and manifests a repository links (shared ones count in each)."""
        digests = repository.layers | repository.manifests
        return sum(self.blobs[d].size for d in digests if d in self.blobs)


def blob_dir(root: Path, digest: str) -> Path:
    return root / Path(layout.blob_data(digest)).parent


def scan(root: Path | Tree) -> Storage:
    tree = FileTree(root) if isinstance(root, Path) else root
    blobs: dict[str, Blob] = {}
    repositories: dict[str, Repository] = {}
    tag_links: list[tuple[Repository, str, str]] = []
    total = 0
    for path, size, mtime in tree.files():
        total += size
        if match := _BLOB.fullmatch(path):
            digest = f"{match[1]}:{match[2]}"
            blobs[digest] = Blob(digest, size, mtime)
        elif match := _REPOSITORY_FILE.fullmatch(path):
            name, part, rest = match.groups()
            repository = repositories.setdefault(name, Repository(name))
            if part == "_layers" and (link := _LINK.fullmatch(rest)):
                repository.layers.add(f"{link[1]}:{link[2]}")
            elif part == "_manifests" and rest.startswith("revisions/") and (link := _LINK.fullmatch(rest[10:])):
                repository.manifests.add(f"{link[1]}:{link[2]}")
            elif part == "_manifests" and (tag := _TAG.fullmatch(rest)):
                tag_links.append((repository, tag[1], path))
    for repository, tag, path in tag_links:
        if digest := (tree.read(path, MAX_LINK) or b"").decode(errors="replace").strip():
            repository.tags[tag] = digest
    return Storage(tree, blobs, repositories, total)


def manifest_references(document_bytes: bytes | None) -> set[str]:
    try:
        document = json.loads(document_bytes or b"")
    except ValueError:
        return set()
    if not isinstance(document, dict):
        return set()
    described = [document.get("config"), *(document.get("layers") or []), *(document.get("manifests") or [])]
    return {d["digest"] for d in described if isinstance(d, dict) and isinstance(d.get("digest"), str)}
