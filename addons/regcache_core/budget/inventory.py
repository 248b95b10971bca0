"""What the caches run here hold, for `regcache cache du` and `regcache cache ls`: read from
their storage (storage.py) and the usage store (with replicas: the cluster's, in Redis), without
the stack having to run."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..cluster.link import SharedStateDown
from ..cluster.usage import read_last_pulls
from ..objectstore.tree import ObjectTree
from ..stack.caches import CacheBackend, local_backends
from ..config import Config
from ..observe.stats import human_bytes, table
from .disk import free_bytes
from .storage import scan
from .usage import UsageStore, usage_file


@contextmanager
def _tree(config: Config, backend: CacheBackend) -> Iterator[Path | ObjectTree]:
    """Where the cache's storage is read: its directory, or its objects in an object store."""
    if backend.storage is not None:
        yield backend.storage
        return
    tree = ObjectTree(config.s3, backend.registry.object_store, config.upstream_timeout)
    try:
        yield tree
    finally:
        tree.close()


def disk_usage(config: Config) -> dict:
    caches = []
    for backend in local_backends(config):
        with _tree(config, backend) as tree:
            storage = scan(tree)
        caches.append({
            "registry": backend.registry.name,
            "storage": str(tree),
            "bytes": storage.total,
            "budget": backend.registry.max_disk,
            "free_disk": free_bytes(backend.storage) if backend.storage else None,  # an object store's is not ours
            "repositories": sorted(({"repository": name, "bytes": storage.bytes_of(r)}
                                    for name, r in storage.repositories.items()), key=lambda r: -r["bytes"]),
        })
    return {"caches": caches, "bytes": sum(c["bytes"] for c in caches), "budget": config.max_disk}


def holdings(config: Config) -> dict:
    """Per cache: repositories, the tags they hold and when each was last pulled through regcache
    (through any replica, with replicas)."""
    backends = local_backends(config)
    shared = None
    if config.cluster is not None:
        try:
            shared = read_last_pulls(config.cluster.redis_url, config.cluster.redis_timeout,
                                     [b.registry.name for b in backends])
        except SharedStateDown as e:
            print(f"regcache: shared state unreachable ({e}): last pulls as this replica recorded them", file=sys.stderr)
    path = usage_file(config.data_dir)
    store = UsageStore(path) if shared is None and path.exists() else None
    try:
        caches = []
        for backend in backends:
            if shared is not None:
                pulls = shared[backend.registry.name]
            else:
                pulls = store.last_pulls(backend.registry.name) if store else {}
            repositories = []
            with _tree(config, backend) as tree:
                held = scan(tree)
            for name, repository in sorted(held.repositories.items()):
                tags = [{"tag": tag, "digest": digest,
                         "last_pulled": _iso(max(pulls.get((name, tag), 0), pulls.get((name, digest), 0)))}
                        for tag, digest in sorted(repository.tags.items())]
                repositories.append({"repository": name, "tags": tags, "manifests": len(repository.manifests)})
            caches.append({"registry": backend.registry.name, "repositories": repositories})
        return {"caches": caches}
    finally:
        if store:
            store.close()


def format_du(usage: dict) -> str:
    rows = []
    for cache in usage["caches"]:
        budget = human_bytes(cache["budget"]) if cache["budget"] else "-"
        free = human_bytes(cache["free_disk"]) if cache["free_disk"] is not None else "-"
        rows.append((cache["registry"], human_bytes(cache["bytes"]), budget, free))
        rows += [(f"  {r['repository']}", human_bytes(r["bytes"]), "", "") for r in cache["repositories"]]
    total_budget = human_bytes(usage["budget"]) if usage["budget"] else "-"
    rows.append(("all caches", human_bytes(usage["bytes"]), total_budget, ""))
    return "\n".join(table(("registry / repository", "bytes", "budget", "free disk"), rows))


def format_ls(held: dict) -> str:
    rows = [(f"{cache['registry']}/{r['repository']}", t["tag"], t["digest"][:19], t["last_pulled"] or "-")
            for cache in held["caches"] for r in cache["repositories"] for t in r["tags"]]
    return "\n".join(table(("repository", "tag", "digest", "last pulled"), rows))


def _iso(timestamp: float) -> str | None:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds") if timestamp else None
