"""What the caches run here hold, for `regcache cache du` and `regcache cache ls`: read from
their storage (storage.py) and the usage store (with replicas: the cluster's, in Redis), without
the stack having to run."""

from __future__ import annotations

import sys
from datetime import datetime, timezone

from ..cluster.link import SharedStateDown
from ..cluster.usage import read_last_pulls

from ..stack.caches import local_backends
from ..config import Config
from ..observe.stats import human_bytes, table
from .disk import free_bytes
from .storage import scan
from .usage import UsageStore, usage_file


def disk_usage(config: Config) -> dict:
    caches = []
    for backend in local_backends(config):
        storage = scan(backend.storage)
        caches.append({
            "registry": backend.registry.name,
            "storage": str(backend.storage),
            "bytes": storage.total,
            "budget": backend.registry.max_disk,
            "free_disk": free_bytes(backend.storage),
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
            for name, repository in sorted(scan(backend.storage).repositories.items()):
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
        rows.append((cache["registry"], human_bytes(cache["bytes"]), budget, human_bytes(cache["free_disk"])))
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
