"""Manifests by digest, in memory: a digest names its bytes forever, so a manifest once seen can
be answered without asking the cache, with the headers registry:2 sent for it.

Bounded by the bytes of the bodies held (REGCACHE_MANIFEST_CACHE); the least recently used go
first. Only a body whose sha256 is its digest gets in: what the cache answered is checked, not
trusted, before it is served to others.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

# What registry:2 answers a manifest with, and clients read.
KEPT_HEADERS = frozenset({"content-type", "docker-content-digest", "content-length", "etag", "docker-distribution-api-version"})


@dataclass(frozen=True)
class Manifest:
    body: bytes
    headers: tuple[tuple[str, str], ...]  # the answer's KEPT_HEADERS, spelt as it spelt them
    media_type: str  # its Content-Type, lower case


class ManifestCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0  # bytes of the bodies held
        self._entries: OrderedDict[tuple[str, str], Manifest] = OrderedDict()

    def get(self, registry: str, digest: str) -> Manifest | None:
        key = (registry, digest)
        manifest = self._entries.get(key)
        if manifest is not None:
            self._entries.move_to_end(key)
        return manifest

    def put(self, registry: str, digest: str, body: bytes, headers: Mapping[str, str]) -> Manifest | None:
        """Keep `body` (an answer's whole body, `headers` its headers) if it is `digest`'s content
        and fits; returns what is kept."""
        if len(body) > self.max_bytes or not matches(digest, body):
            return None
        key = (registry, digest)
        if (old := self._entries.pop(key, None)) is not None:
            self.size -= len(old.body)
        manifest = self._entries[key] = Manifest(body, tuple(
            (name, value) for name, value in headers.items() if name.lower() in KEPT_HEADERS), media_type(headers))
        self.size += len(body)
        while self.size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.size -= len(evicted.body)
        return manifest

    def __len__(self) -> int:
        return len(self._entries)


def matches(digest: str, body: bytes) -> bool:
    algorithm, _, hex_digits = digest.partition(":")
    return algorithm in ("sha256", "sha512") and hashlib.new(algorithm, body).hexdigest() == hex_digits


def media_type(headers: Mapping[str, str]) -> str:
    """An answer's Content-Type without parameters, lower case: what Accept lists are matched with."""
    return headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
