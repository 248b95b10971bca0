"""Manifest requests of cached registries answered in front of the cache, from what regcache
has learnt: the tag cache (tags.py) and the manifests in memory (manifests.py).

- A manifest by digest held in memory is answered from memory.
- A fresh tag is answered from memory, or, when its body is not held, sent to the cache by
  digest (registry:2 answers a digest it holds without asking upstream).
- A stale tag is revalidated with one HEAD upstream (Docker Hub does not count a HEAD as a
  pull; concurrent requests for one tag share it): the same digest makes it fresh again and it
  is served as above; another digest, or none, sends the request to the cache as it came, which
  fetches the new manifest. No answer in time (or an upstream known to be down, or an error
  status) serves the last known digest at once, marked `stale`.
- Only a client whose Accept names the media type held is answered this way; others, and
  anything not known, go to the cache as they came: one at a time per reference, the others
  waiting for the first one's answer and planned again from it (one upstream HEAD and GET per
  cold tag however many pull it at once; flights.py, for one process or for the cluster).

What is learnt comes from the answers the cache gives clients (`learn`). No mitmproxy here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Registry
from .by_digest import Manifest, ManifestCache, matches, media_type
from .flights import LocalFlights, ReferenceFlights
from ..routing import DIGEST, Refusal, upstream_unreachable
from .tags import TagEntry, TagStore
from ..upstream.auth import UpstreamAuthError
from ..upstream.client import NoAnswer, UpstreamClient
from ..upstream.signals import UpstreamAnswers


@dataclass(frozen=True)
class Plan:
    """How to answer a manifest request: from `manifest` when set, else by asking the cache for
    `digest`. `cache` is what the pull log says: "hit" or "stale"."""

    digest: str
    manifest: Manifest | None
    cache: str


class RevalidationFailed(Exception):
    pass


def accepted_types(accept_lines: list[str]) -> set[str]:
    """Media types named in every Accept line (skopeo and dockerd send several, containerd one
    comma-joined line), parameters such as q= dropped."""
    return {part.split(";", 1)[0].strip().lower() for line in accept_lines for part in line.split(",")} - {""}


class ManifestFront:
    def __init__(self, tags: TagStore, manifests: ManifestCache, client: UpstreamClient, upstream: UpstreamAnswers,
                 flights: ReferenceFlights | None = None) -> None:
        self.tags = tags
        self.manifests = manifests
        self.client = client  # the tag HEADs, within its deadline
        self.upstream = upstream  # credentials, and where what the upstream answered is reported
        self.state = upstream.state
        self.flights = flights or LocalFlights()
        self._revalidations: dict[tuple[str, str, str, str], asyncio.Task] = {}

    async def plan(self, registry: Registry, repository: str, reference: str, accept_lines: list[str]) -> Plan | None:
        """How to answer a GET or HEAD of a manifest ourselves; None sends it to the cache as it came.

        A request that cannot be planned while another one for the same reference is at the
        cache waits for that one's answer (`answered`), up to FIRST_WAIT seconds, and is planned
        again: a cold tag that many pull at once costs the cache, and so the upstream, one
        request, not one per client. The first one's caller must call `answered`."""
        if (plan := await self._plan(registry, repository, reference, accept_lines)) is not None:
            return plan
        key = (registry.name, repository, reference)
        if await self.flights.first(key):
            # The first look read the tag store in a thread (or Redis), and may predate an answer
            # learnt meanwhile (that answer's `answered` found nobody waiting): look again.
            if (plan := await self._plan(registry, repository, reference, accept_lines)) is not None:
                self.flights.answered(key)
                return plan
            return None
        return await self._plan(registry, repository, reference, accept_lines)

    def answered(self, registry: Registry, repository: str, reference: str) -> None:
        """The cache answered a request for this reference planned None (or it failed): the
        requests waiting for it are planned again, from what `learn` took from the answer."""
        self.flights.answered((registry.name, repository, reference))

    async def _plan(self, registry: Registry, repository: str, reference: str, accept_lines: list[str]) -> Plan | None:
        accepted = accepted_types(accept_lines)
        if ":" in reference:
            manifest = self.manifests.get(registry.name, reference)
            if manifest is not None and manifest.media_type in accepted:
                return Plan(reference, manifest, "hit")
            return None
        entry = await self.tags.get(registry.name, repository, reference)
        if entry is None or entry.media_type not in accepted:
            return None
        if self.tags.is_fresh(entry):
            return self._serve(registry, entry, "hit")
        if self.state.reason_down(registry.name):
            return self._serve(registry, entry, "stale")
        try:
            digest = await self._current_digest(registry, repository, reference, entry.media_type)
        except RevalidationFailed:
            return self._serve(registry, entry, "stale")
        if digest != entry.digest:
            return None  # moved (or gone): the cache fetches what the tag names now
        return self._serve(registry, self.tags.refresh(registry.name, repository, reference, entry), "hit")

    def learn(self, registry: Registry, repository: str, reference: str, headers: Mapping[str, str],
              body: bytes | None) -> None:
        """The cache answered a client's manifest request 200 with `headers` (and `body`, for a
        GET): remember the tag's digest and the manifest."""
        digest = headers.get("Docker-Content-Digest", "")
        if not DIGEST.fullmatch(digest) or (":" in reference and reference != digest):
            return
        if body is not None:
            if not matches(digest, body):
                return
            self.manifests.put(registry.name, digest, body, headers)
        if ":" not in reference and not self.state.reason_down(registry.name):
            # With its upstream down the cache answers from its own copy: not a fresh answer.
            size = int(headers.get("Content-Length", "0") or 0) if body is None else len(body)
            self.tags.learn(registry.name, repository, reference, digest, media_type(headers), size)

    def outage_answer(self, registry: Registry, reference: str, status: int) -> Refusal | None:
        """The cache had no answer (404, or registry:2's 500 for a digest) while the upstream is
        down: say so, rather than let a user look for a typo."""
        reason = self.state.reason_down(registry.name)
        if reason is None or status not in (404, 500):
            return None
        return upstream_unreachable(registry, reason, reference)

    def close(self) -> None:
        """Revalidations under way stop, and nobody waits for this front's answers any more. The tag
        cache and the client are their owner's to close."""
        for task in self._revalidations.values():
            task.cancel()
        self.flights.close()

    def _serve(self, registry: Registry, entry: TagEntry, cache: str) -> Plan:
        return Plan(entry.digest, self.manifests.get(registry.name, entry.digest), cache)

    async def _current_digest(self, registry: Registry, repository: str, tag: str, accept: str) -> str | None:
        key = (registry.name, repository, tag, accept)
        task = self._revalidations.get(key)
        if task is None:
            task = self._revalidations[key] = asyncio.get_running_loop().create_task(
                self.flights.revalidation(key, lambda: self._revalidate(registry, repository, tag, accept)))
            task.add_done_callback(lambda _: self._revalidations.pop(key, None))
        outcome = await asyncio.shield(task)
        # Outcomes are text, so that another replica can read them: "<digest>", "gone", "failed <why>".
        if outcome.startswith("failed "):
            raise RevalidationFailed(outcome.removeprefix("failed "))
        return None if outcome == "gone" else outcome

    async def _revalidate(self, registry: Registry, repository: str, tag: str, accept: str) -> str:
        try:
            digest = await self._head(registry, repository, tag, accept)
        except RevalidationFailed as e:
            return f"failed {e}"
        return "gone" if digest is None else digest

    async def _head(self, registry: Registry, repository: str, tag: str, accept: str) -> str | None:
        """The digest the upstream's tag names now (None: no such tag); RevalidationFailed when
        the upstream cannot say."""
        try:
            # One bound for it all: a token may have to be fetched first.
            async with asyncio.timeout(self.client.timeout):
                authorization = await self.upstream.authorization(registry, repository)
                headers = {"Accept": accept, **({"Authorization": authorization} if authorization else {})}
                status, answer = await self.client.head(f"{registry.upstream}/v2/{repository}/manifests/{tag}", headers)
        except UpstreamAuthError as e:
            raise RevalidationFailed(str(e)) from None
        except (NoAnswer, TimeoutError) as e:
            reason = e.reason if isinstance(e, NoAnswer) else "timeout"
            self.upstream.failed(registry, reason)
            raise RevalidationFailed(reason) from None
        # Rate limits and 429s too: Docker Hub sends its headers on HEADs.
        self.upstream.answered(registry, repository, status, answer)
        if status == 404:
            return None
        if status != 200:
            raise RevalidationFailed(f"upstream answered {status}")
        return answer.get("Docker-Content-Digest")

