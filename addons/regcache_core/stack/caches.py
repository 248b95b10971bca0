"""The registry:2 pull-through caches that `regcache up` runs natively, one per registry."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..config import Config, Registry, S3Access, is_local

# Debian installs the registry:2 program as docker-registry; upstream builds call it registry.
REGISTRY_PROGRAMS = ("registry", "docker-registry")
# What registry:2 says as it gives up, in its text log: a fatal line, or a Go panic.
_ERROR_LINE = re.compile(r'level=(?:fatal|panic) msg="((?:[^"\\]|\\.)*)"|^panic: (.*)$')
LOG_TAIL = 64 << 10  # bytes of a cache's log read for why it exited
INSTALL_HINT = "install it with `apt-get install docker-registry` (Debian/Ubuntu) or put distribution's `registry` binary on PATH"


@dataclass(frozen=True)
class CacheBackend:
    registry: Registry
    root: Path  # holds config.yml and registry.log (and storage/, unless K_STORAGE says otherwise)
    remoteurl: str  # the proxy's egress listener for this registry, never the upstream itself
    http_secret: str  # registry:2's http.secret: the same on every replica whose caches share storage
    expiry_deletes: bool  # registry:2's own 7-day expiry deletes: only for a cache without a disk budget
    s3: S3Access  # how it reaches its object store, when K_STORAGE is s3://

    @property
    def config_file(self) -> Path:
        return self.root / "config.yml"

    @property
    def log_file(self) -> Path:
        return self.root / "registry.log"

    @property
    def storage(self) -> Path | None:
        """Where it keeps blobs and manifests on a filesystem: the registry's `storage` (set for
        every local cache but those on an object store)."""
        return self.registry.storage


def local_backends(config: Config) -> list[CacheBackend]:
    """The caches this machine runs: those whose URL points at loopback.

    A cache URL naming another host is somebody else's to run (a compose service, say).
    """
    secret = http_secret(config)
    return [
        CacheBackend(r, config.data_dir / r.key.lower(), config.egress_url(r), secret,
                     expiry_deletes=config.max_disk is None and r.max_disk is None, s3=config.s3)
        for r in config.registries
        if r.cache and is_local(r.cache)
    ]


def http_secret(config: Config) -> str:
    """registry:2's `http.secret`, which signs the upload state it hands out: instances on one
    storage behind a load balancer must share it (distribution's docs), so replicas derive it
    from REGCACHE_CLUSTER_SECRET (the secret itself stays out of registry:2's config); a single
    node gets a random one per start."""
    if config.cluster is None:
        return secrets.token_hex(16)
    return hmac.new(config.cluster.secret, b"registry:2 http.secret", hashlib.sha256).hexdigest()


def find_registry_program() -> str | None:
    return next(filter(None, map(shutil.which, REGISTRY_PROGRAMS)), None)


def registry_config(backend: CacheBackend) -> dict:
    """distribution's configuration for one pull-through cache.

    It holds no credentials: the cache's upstream is the proxy's egress listener, which adds them,
    and an object store's keys go in its environment (cache_environment).

    registry:2 (distribution 2.8) schedules every blob and manifest it stores to expire 7 days
    later, whether pulled since or not, and has no setting for it (`proxy.ttl` came in 3.0). Its
    expiry deletes through the repository's blob store, which refuses while `storage.delete` is
    off: it logs "Scheduler error returned from OnExpire" and forgets the entry. So a cache
    with a disk budget (K_MAX_DISK, REGCACHE_MAX_DISK) has deleting off, and the budget is its
    only evictor (least recently pulled first; budget/eviction.py works on the files): nothing
    in use goes at 7 days, and no replica's registry:2 removes content from under the others on
    shared storage. A cache without a budget keeps the 7-day expiry, its only bound.
    """
    cache = urlsplit(backend.registry.cache)
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            **_driver(backend.registry, backend.s3),
            "delete": {"enabled": backend.expiry_deletes},
            "maintenance": {"uploadpurging": _upload_purging(backend.registry)},
        },
        "http": {
            "addr": f"[{cache.hostname}]:{cache.port or 80}" if ":" in cache.hostname else f"{cache.hostname}:{cache.port or 80}",
            "secret": backend.http_secret,
        },
        "proxy": {"remoteurl": backend.remoteurl},
    }


def _upload_purging(registry: Registry) -> dict:
    """A pull cut short leaves a partial upload under _uploads: on a filesystem it goes after an
    hour. Not on an object store: 2.8's purger walks every repository's keys and panics ("index
    out of range [0] with length 0", purgeuploads.go) on a key that ends in "/", which stores
    that list empty folders return (SeaweedFS does, for a folder whose files were deleted). Its
    first run comes at a random minute of the first hour, so such a cache died within the hour."""
    if registry.object_store is not None:
        return {"enabled": False}
    return {"enabled": True, "age": "1h", "interval": "10m", "dryrun": False}


def _driver(registry: Registry, s3: S3Access) -> dict:
    """The storage driver's part: a filesystem root, or registry:2 2.8's s3 driver."""
    store = registry.object_store
    if store is None:
        return {"filesystem": {"rootdirectory": str(registry.storage)}}
    driver = {"bucket": store.bucket, "region": s3.region, "rootdirectory": f"/{store.prefix}"}
    if s3.endpoint:
        # With an endpoint 2.8 always addresses buckets by path; `secure` picks the scheme.
        driver |= {"regionendpoint": s3.endpoint, "secure": s3.endpoint.startswith("https:")}
    # regcache answers warm blob GETs itself (a presigned URL, when REGCACHE_S3_REDIRECT says so):
    # what reaches the cache is streamed by it, so clients need not reach the store.
    return {"s3": driver, "redirect": {"disable": True}}


def cache_environment(backend: CacheBackend) -> dict[str, str]:
    """A cache's environment: PATH, and the object store's keys (registry:2's overrides of its
    config), never in a file or its arguments. Nothing else of ours: our environment may hold
    upstream passwords, which caches never need, and registry:2 2.8 panics at start when
    AWS_CA_BUNDLE is set."""
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    s3 = backend.s3
    if backend.registry.object_store is None or not s3.access_key:
        return env
    if s3.session_token:
        # 2.8's s3 driver has no key for a session token (3.0 added `sessiontoken`): with none in its
        # config its credential chain reads the AWS SDK's variables, the token with them.
        return env | {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                      "AWS_SESSION_TOKEN": s3.session_token}
    return env | {"REGISTRY_STORAGE_S3_ACCESSKEY": s3.access_key, "REGISTRY_STORAGE_S3_SECRETKEY": s3.secret_key}


def write_registry_config(backend: CacheBackend) -> Path:
    """Write config.yml (JSON is valid YAML), readable by its owner only (it holds the HTTP secret)."""
    backend.root.mkdir(parents=True, exist_ok=True)  # not made by the storage's mkdir when K_STORAGE is elsewhere
    if backend.storage is not None:  # none for a cache on an object store
        backend.storage.mkdir(parents=True, exist_ok=True)
    fd = os.open(backend.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(registry_config(backend), f, indent=2)
    os.chmod(backend.config_file, 0o600)
    return backend.config_file


def exit_reason(log_file: Path, since: int) -> str | None:
    """The last error a cache wrote to its log after byte `since` (where this run of it began):
    why it exited, in its own words, e.g. "listen tcp 127.0.0.1:5001: bind: address already in use"."""
    try:
        with open(log_file, "rb") as log:
            log.seek(max(since, log.seek(0, os.SEEK_END) - LOG_TAIL))
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if match := _ERROR_LINE.search(line):
            return (match[1] or "").replace('\\"', '"') or match[2]
    return None
