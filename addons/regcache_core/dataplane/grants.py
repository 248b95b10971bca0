"""Grants: what a data-plane URL lets its holder fetch, signed by the proxy.

The data plane is not a second router: it serves exactly what a grant names (one blob, or one
spool, of one repository of one registry, of one size), until the grant expires. Every access
rule the proxy applies when it hands out the URL therefore holds for the data plane too.

The proxy and every data-plane worker sign and check with one key (`grant_key`). On one node it
is kept in the data dir (`load_or_create_key`): whichever process starts first creates it. With
replicas it is derived from REGCACHE_CLUSTER_SECRET, so every replica's data plane accepts the
grants any replica signs: a replica sends the requests for a blob another one is downloading to
that one's data plane (cluster/blob_flights.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..access.signing import FieldSigner
from ..config import Config

# The data plane's path for each kind: a warm blob from a cache's storage; a cold blob from its
# download's spool, for a cache's fetch ("spool") or for a client ("cold").
GRANT_PATHS = {"blob": "/_regcache/blob", "spool": "/_regcache/spool", "cold": "/_regcache/cold"}
CACHE_RESULTS = ("hit", "miss")  # what a client's transfer was, for its pull record
GRANT_LIFETIME = 300  # seconds: clients follow a 307 at once; containerd's resumed Range GETs come soon after
KEY_FILE = "dataplane.key"
KEY_BYTES = 32
_SIZE = re.compile(r"[0-9]{1,15}")


@dataclass(frozen=True)
class Grant:
    kind: str  # "blob" | "spool"
    registry: str  # the registry's name, e.g. docker.io
    repository: str
    digest: str
    size: int  # bytes
    expires: int  # unix seconds
    cache: str = "hit"  # the pull record's mark: "miss" for the client whose request brought a cold blob


class GrantSigner:
    def __init__(self, key: bytes, clock=time.time) -> None:
        self._fields = FieldSigner(key, clock)

    def grant(self, kind: str, registry: str, repository: str, digest: str, size: int, cache: str = "hit") -> Grant:
        """A grant for these, expiring GRANT_LIFETIME seconds from now."""
        return Grant(kind, registry, repository, digest, size, self._fields.now() + GRANT_LIFETIME, cache)

    def query(self, grant: Grant) -> str:
        fields = {"kind": grant.kind, "registry": grant.registry, "repository": grant.repository,
                  "digest": grant.digest, "size": str(grant.size), "cache": grant.cache}
        return self._fields.query(fields, grant.expires)

    def url(self, base: str, grant: Grant) -> str:
        """The data-plane URL of `grant`, on `base` (`http://host:port`)."""
        return f"{base}{GRANT_PATHS[grant.kind]}?{self.query(grant)}"

    def verify(self, query: str, kind: str) -> Grant | None:
        """The grant a query carries; None when unsigned, altered, expired or of another kind."""
        fields = self._fields.verify(query)
        if (fields is None or fields.get("kind") != kind or not _SIZE.fullmatch(fields.get("size", ""))
                or fields.get("cache") not in CACHE_RESULTS):
            return None
        return Grant(kind, fields.get("registry", ""), fields.get("repository", ""), fields.get("digest", ""),
                     int(fields["size"]), int(fields["exp"]), fields["cache"])


def grant_key(config: Config) -> bytes:
    """The key grants are signed and checked with: the replicas' shared one, or this node's own."""
    if config.cluster is not None:
        # Derived, not the secret itself: the secret is also the caches' http.secret.
        return hmac.new(config.cluster.secret, b"regcache data-plane grants", hashlib.sha256).digest()
    return load_or_create_key(config.data_dir)


def load_or_create_key(data_dir: Path) -> bytes:
    """The data plane's signing key: read from the data dir, or made there (mode 0600).

    The key is written whole to a file of its own, then linked into place, which fails if the
    key is there already (like O_EXCL): of two processes starting at once, one key wins and
    both read it, and nobody ever reads a key half written.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / KEY_FILE
    if not path.exists():
        draft = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
            os.link(draft, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            draft.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path}: not a data-plane key ({len(key)} bytes, expected {KEY_BYTES}); delete it to make a new one")
    return key
