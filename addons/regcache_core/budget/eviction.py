"""Eviction: when a cache's storage passes its budget (K_MAX_DISK), or all caches together pass
REGCACHE_MAX_DISK, remove the least recently used blobs until under LOW_WATER of it, with the
links and manifests that only they serve.

registry:2 in proxy mode refuses DELETE, so this works on its storage (a filesystem, or the
objects of an object store: storage.py's Tree), in the order that keeps it consistent for a
running registry:2 (distribution 2.8's registry/storage and registry/proxy):
- A blob goes with its `data` file first: registry:2 checks that file (`Stat`) before serving a
  blob, finds it gone and fetches the blob again (a miss). Removing the repositories' `_layers`
  links too leaves no link to a missing blob. A request already being answered keeps its open
  file (Linux keeps an unlinked file until it is closed), and blobs in flight are skipped
  anyway (`busy`: through the proxy, or handed to a client by a URL that is still valid; with
  replicas, sent by any replica).
- A manifest goes when every blob it names is gone and one of them went now (an index when its
  manifests went): its revision link, the tags pointing at it, and its data once no repository
  links it.
- `_uploads` (writes in progress) and `scheduler-state.json` are never touched. The scheduler
  keeps its entries in memory and rewrites that file; an entry for evicted content expires
  into a logged "unknown blob" error, and a new fetch of the content replaces the entry.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from ..objectstore import layout
from .storage import Blob, Repository, Storage

LOW_WATER = 0.9  # evict down to this share of the budget, so the next pull does not evict again


@dataclass
class CacheDisk:
    """One cache's state for a run."""

    registry: str
    storage: Storage
    budget: int | None  # its own budget (K_MAX_DISK), if any
    last_use: dict[str, float]  # blob digest -> last client pull
    evict: list[str] = field(default_factory=list)  # chosen blobs, least recently used first
    skipped: set[str] = field(default_factory=set)  # blobs whose turn came while a pull read them: left

    def candidates(self) -> list[tuple[float, str, int]]:
        """(last use, digest, size) of its evictable blobs, least recently used first.

        Manifests are not ranked: they go with their blobs. A blob never pulled through us (or
        stored after its pull was recorded) counts as used when registry:2 stored it.
        """
        manifests = {d for r in self.storage.repositories.values() for d in r.manifests}
        return sorted((max(self.last_use.get(b.digest, 0.0), b.mtime), b.digest, b.size)
                      for b in self.storage.blobs.values() if b.digest not in manifests)


def choose(caches: list[CacheDisk], total_budget: int | None, busy: Callable[[str, str], bool]) -> None:
    """Fill each cache's `evict`: first for caches over their own budget, then, least recently
    used across all caches, until their total is under REGCACHE_MAX_DISK's low-water mark. A blob
    is asked about (`busy`: it may ask Redis) only when its turn comes."""
    used = {c.registry: c.storage.total for c in caches}
    queues = {c.registry: c.candidates() for c in caches}
    for cache in caches:
        if cache.budget is not None and used[cache.registry] > cache.budget:
            queue = queues[cache.registry]
            while queue and used[cache.registry] > cache.budget * LOW_WATER:
                _, digest, size = queue.pop(0)
                if busy(cache.registry, digest):
                    cache.skipped.add(digest)
                else:
                    cache.evict.append(digest)
                    used[cache.registry] -= size
    if total_budget is None or sum(used.values()) <= total_budget:
        return
    by_registry = {c.registry: c for c in caches}
    merged = heapq.merge(*([(t, r, d, s) for t, d, s in q] for r, q in queues.items()))
    for _, registry, digest, size in merged:
        if sum(used.values()) <= total_budget * LOW_WATER:
            break
        if busy(registry, digest):
            by_registry[registry].skipped.add(digest)
        else:
            by_registry[registry].evict.append(digest)
            used[registry] -= size


@dataclass(frozen=True)
class Evicted:
    blobs: int  # blobs and manifests removed
    bytes: int


def apply(cache: CacheDisk, busy: Callable[[str, str], bool]) -> Evicted:
    """Remove the chosen blobs (each checked once more for a pull in flight), then the manifests
    they alone served."""
    storage = cache.storage
    removed: list[Blob] = []
    for digest in cache.evict:
        if digest not in storage.blobs:
            continue
        if busy(cache.registry, digest):  # a pull began since it was chosen
            cache.skipped.add(digest)
            continue
        _remove_blob(storage, digest)
        for repository in storage.repositories.values():
            if digest in repository.layers:
                storage.tree.remove(f"{_repository_dir(repository)}/_layers/{_digest_path(digest)}")
                repository.layers.discard(digest)
        removed.append(storage.blobs.pop(digest))
    removed += _remove_orphaned_manifests(storage, {b.digest for b in removed})
    return Evicted(len(removed), sum(b.size for b in removed))


def _remove_orphaned_manifests(storage: Storage, evicted: set[str]) -> list[Blob]:
    removed: list[Blob] = []
    gone = set(evicted)
    references = {d: storage.references(d) for r in storage.repositories.values() for d in r.manifests}
    changed = True
    while changed:  # an index goes once the manifests it names went
        changed = False
        for repository in storage.repositories.values():
            for manifest in sorted(repository.manifests):
                names = references.get(manifest, set())
                if names and names & gone and all(n in gone or n not in storage.blobs for n in names):
                    _drop_manifest(storage, repository, manifest)
                    changed = True
                    if not any(manifest in r.manifests or manifest in r.layers for r in storage.repositories.values()):
                        gone.add(manifest)
                        if manifest in storage.blobs:
                            _remove_blob(storage, manifest)
                            removed.append(storage.blobs.pop(manifest))
    return removed


def _drop_manifest(storage: Storage, repository: Repository, digest: str) -> None:
    manifests = f"{_repository_dir(repository)}/_manifests"
    storage.tree.remove(f"{manifests}/revisions/{_digest_path(digest)}")
    for tag, current in list(repository.tags.items()):
        if current == digest:
            storage.tree.remove(f"{manifests}/tags/{tag}")
            del repository.tags[tag]
    for tag in _tags_indexing(storage, repository, digest):
        storage.tree.remove(f"{manifests}/tags/{tag}/index/{_digest_path(digest)}")
    repository.manifests.discard(digest)


def _tags_indexing(storage: Storage, repository: Repository, digest: str) -> set[str]:
    """Tags whose history (`tags/<tag>/index/`) names the manifest: a tag may have moved on."""
    index_link = f"/index/{_digest_path(digest)}/link"
    tags = f"{_repository_dir(repository)}/_manifests/tags/"
    return {path[len(tags):-len(index_link)] for path, _, _ in storage.tree.files(tags)
            if path.endswith(index_link) and "/" not in path[len(tags):-len(index_link)]}


def _remove_blob(storage: Storage, digest: str) -> None:
    data = layout.blob_data(digest)
    storage.tree.remove(data)  # first: registry:2 asks for this file
    storage.tree.remove(data.rpartition("/")[0])


def _repository_dir(repository: Repository) -> str:
    return f"docker/registry/v2/repositories/{repository.name}"


def _digest_path(digest: str) -> str:
    return digest.replace(":", "/", 1)
