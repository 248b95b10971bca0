"""`regcache prefetch`: warm the caches from image references, through the running stack.

Every request goes to the proxy's client port, as a client's would (`?ns=` names the
registry), so credentials, the pull log, hit/miss and the disk budget all apply, and the
content counts as used when prefetched. For each image: its manifest, then for an index the
manifests of the platforms asked for (all by default), then every config and layer, each
read to the end and checked against its digest. Blobs already fetched in this run are not
fetched again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from ..config import Config, local_url

MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)  # a stalled read fails
CHUNK = 1 << 20
_HOST = re.compile(r"[a-z0-9.-]+(?::[0-9]{1,5})?")
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")


class PrefetchError(Exception):
    """Why one image could not be prefetched, in words for its summary line."""


@dataclass(frozen=True)
class ImageReference:
    registry: str
    repository: str
    reference: str  # tag or digest

    def __str__(self) -> str:
        separator = "@" if ":" in self.reference else ":"
        return f"{self.registry}/{self.repository}{separator}{self.reference}"


def parse_reference(text: str) -> ImageReference:
    """`docker.io/library/nginx:1.27`, `ghcr.io/org/app@sha256:...`; a first component without a
    dot or port is a docker.io repository (`nginx` is docker.io/library/nginx:latest)."""
    rest, _, digest = text.strip().partition("@")
    name, tag = rest, ""
    if ":" in rest.rsplit("/", 1)[-1]:
        name, tag = rest.rsplit(":", 1)
    first, _, path = name.partition("/")
    if path and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, path
    else:
        registry, repository = "docker.io", name
    if registry == "docker.io" and "/" not in repository:
        repository = f"library/{repository}"
    if (not _HOST.fullmatch(registry) or not _REPOSITORY.fullmatch(repository) or (tag and not _TAG.fullmatch(tag))
            or (digest and not _DIGEST.fullmatch(digest))):
        raise PrefetchError(f"{text!r} is not an image reference such as docker.io/library/nginx:1.27")
    return ImageReference(registry, repository, digest or tag or "latest")


def parse_platforms(text: str | None) -> set[str] | None:
    """`linux/amd64,linux/arm64/v8` -> {"linux/amd64", "linux/arm64/v8"}; None for all."""
    if not text:
        return None
    platforms = {p.strip() for p in text.split(",") if p.strip()}
    for platform in platforms:
        if not 2 <= platform.count("/") + 1 <= 3:
            raise PrefetchError(f"--platform: {platform!r} is not os/architecture[/variant], e.g. linux/amd64")
    return platforms


@dataclass
class Result:
    image: ImageReference
    platforms: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Progress:
    """Callbacks for the display: an image's total once its manifests are known, bytes as they come."""

    sized: Callable[[ImageReference, int], None]
    advanced: Callable[[ImageReference, int], None]


class Prefetcher:
    def __init__(self, config: Config, session: aiohttp.ClientSession, platforms: set[str] | None,
                 progress: Progress) -> None:
        self.base = local_url("127.0.0.1", config.port)
        self.config = config
        self.session = session
        self.platforms = platforms
        self.progress = progress
        self.fetched: set[tuple[str, str]] = set()  # (registry, digest) taken by some image of this run

    async def prefetch(self, image: ImageReference) -> Result:
        result = Result(image)
        try:
            if self.config.registry(image.registry) is None:
                raise PrefetchError(f"regcache serves no registry {image.registry!r} (REGCACHE_REGISTRIES)")
            manifests = await self._manifests(image, result)
            blobs = {d["digest"]: d.get("size", 0) for m in manifests
                     for d in [m.get("config"), *(m.get("layers") or [])] if isinstance(d, dict) and "digest" in d}
            mine = {d: s for d, s in blobs.items() if (image.registry, d) not in self.fetched}
            self.fetched.update((image.registry, d) for d in mine)
            self.progress.sized(image, sum(mine.values()))
            for digest in mine:
                result.bytes += await self._blob(image, digest)
                result.blobs += 1
        except PrefetchError as e:
            result.error = str(e)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            result.error = f"no answer from regcache at {self.base}: {e or type(e).__name__}; is `regcache up` running?"
        return result

    async def _manifests(self, image: ImageReference, result: Result) -> list[dict]:
        top = await self._manifest(image, image.reference)
        if "manifests" not in top:
            result.platforms = ["(single)"]
            return [top]
        children = [m for m in top["manifests"] if self._wanted(m.get("platform") or {})]
        if not children:
            raise PrefetchError(f"has none of the platforms {', '.join(sorted(self.platforms))}")
        result.platforms = [platform_name(m.get("platform") or {}) for m in children]
        return [await self._manifest(image, m["digest"]) for m in children]

    def _wanted(self, platform: dict) -> bool:
        name = platform_name(platform)
        if name == "unknown/unknown":
            return False  # attestations (buildx), not images
        return self.platforms is None or name in self.platforms or name.rsplit("/", 1)[0] in self.platforms

    async def _manifest(self, image: ImageReference, reference: str) -> dict:
        url = f"{self.base}/v2/{image.repository}/manifests/{reference}"
        async with self.session.get(url, params={"ns": image.registry}, headers={"Accept": MANIFEST_TYPES}) as response:
            body = await response.read()
            if response.status != 200:
                raise PrefetchError(f"manifest {reference}: {response.status} {_error_message(body)}")
        try:
            return dict(json.loads(body))
        except (ValueError, TypeError):
            raise PrefetchError(f"manifest {reference}: not a JSON manifest") from None

    async def _blob(self, image: ImageReference, digest: str) -> int:
        url = f"{self.base}/v2/{image.repository}/blobs/{digest}"
        hashed, count = hashlib.sha256(), 0
        async with self.session.get(url, params={"ns": image.registry}) as response:
            if response.status != 200:
                raise PrefetchError(f"blob {digest}: {response.status} {_error_message(await response.read())}")
            async for chunk in response.content.iter_chunked(CHUNK):
                hashed.update(chunk)
                count += len(chunk)
                self.progress.advanced(image, len(chunk))
        if digest.startswith("sha256:") and f"sha256:{hashed.hexdigest()}" != digest:
            raise PrefetchError(f"blob {digest}: got content with another digest")
        return count


def platform_name(platform: dict) -> str:
    parts = [platform.get("os", "unknown"), platform.get("architecture", "unknown")]
    return "/".join(parts + ([platform["variant"]] if platform.get("variant") else []))


def _error_message(body: bytes) -> str:
    """The registry error's message, if the body is one; else nothing."""
    try:
        return "; ".join(e.get("message", "") for e in json.loads(body)["errors"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""


async def prefetch_all(config: Config, images: list[ImageReference], platforms: set[str] | None, jobs: int,
                       progress: Progress) -> list[Result]:
    """Each image once, `jobs` at a time; results in the order given."""
    limit = asyncio.Semaphore(jobs)
    async with aiohttp.ClientSession(timeout=TIMEOUT, trust_env=False) as session:
        prefetcher = Prefetcher(config, session, platforms, progress)

        async def one(image: ImageReference) -> Result:
            async with limit:
                return await prefetcher.prefetch(image)

        return list(await asyncio.gather(*map(one, images)))
