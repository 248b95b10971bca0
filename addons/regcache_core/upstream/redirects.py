"""Upstream redirects (a blob GET answered with 307 to a CDN), followed through regcache.

The Location an upstream gives is replaced by a path on the listener the request came in on,
carrying the target URL, an expiry time and an HMAC of both under a key that lives only in
this process. A GET or HEAD of that path goes to the target, without our Authorization header,
so the bytes pass through (and are seen by) the proxy. Only targets we signed, and only for a
few minutes, are followed: the path cannot be used to make regcache fetch any other URL, or a
URL it signed long ago.

Where a redirect may lead (checked when we sign it, and again when it is followed):
- an https upstream's redirects must stay on https;
- never to this machine or its link: a target whose host is, or resolves to, a loopback,
  link-local or unspecified address (or is `localhost`) is refused, so an upstream cannot point
  regcache at its own admin or egress listeners or at a cloud metadata service. Only an
  upstream that is itself on loopback (a registry on this machine, as in the tests) may
  redirect to loopback. Private (RFC 1918) addresses are allowed: registries inside a company
  network keep their blobs there.
A refused Location is removed from the answer; a refused follow-up is answered 403. A followed
one connects to the address that was checked (resolve_destination).

What a redirect is (REDIRECT_STATUSES with a Location: `redirect_location`) is the same for
every exchange with an upstream: the ones through the proxy, token fetches and challenges
(upstream/client.py) and spools' downloads (spool/worker.py); the last two follow redirects
with `follow_redirects`, up to MAX_REDIRECTS hops.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from ..config import Registry, is_local, parse_ip
from ..routing import Target
from ..access.signing import FieldSigner

REDIRECT_PATH = "/_regcache/redirect"
REDIRECT_LIFETIME = 300  # seconds a signed redirect path can be followed; clients follow at once
REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))
MAX_REDIRECTS = 5  # hops regcache's own requests follow; Docker Hub's blob to its CDN is one


Answer = TypeVar("Answer")


def redirect_location(status: int, headers: Mapping[str, str]) -> str | None:
    """Where an answer redirects to, as the upstream wrote it (maybe relative); None for an
    answer that is no redirect."""
    return headers.get("Location") if status in REDIRECT_STATUSES else None


class TooManyRedirects(Exception):
    pass


async def follow_redirects(url: str, fetch: Callable[[str, str | None], Awaitable[tuple[Answer, str | None]]]) -> Answer:
    """The answer at the end of `url`'s redirects. `fetch(url, redirected_from)` asks one URL
    (`redirected_from` None: the first) and returns its answer and where it redirects to (None:
    it is the answer); it raises where a redirect may not lead, and releases an answer that
    redirects. Raises TooManyRedirects after MAX_REDIRECTS hops."""
    redirected_from = None
    for _ in range(MAX_REDIRECTS + 1):
        answer, location = await fetch(url, redirected_from)
        if location is None:
            return answer
        redirected_from, url = url, urljoin(url, location)
    raise TooManyRedirects(f"more than {MAX_REDIRECTS} redirects")


def is_redirect_path(path: str) -> bool:
    return path.partition("?")[0] == REDIRECT_PATH


@dataclass(frozen=True)
class SignedRedirect:
    """What a redirect path carries: where it leads, and the request of a client (or cache) it
    answers, so that the follow-up is logged as that registry's blob."""

    url: str
    registry: str  # the name of the registry whose upstream redirected
    kind: str
    repository: str | None
    reference: str | None


class RedirectSigner:
    def __init__(self, key: bytes | None = None, clock=time.time) -> None:
        self._fields = FieldSigner(key or secrets.token_bytes(32), clock)

    def location(self, request_url: str, location: str, answers: Target) -> str | None:
        """Our Location for `location`, which the upstream of `answers.registry` (or a CDN it
        sent us to) gave in answer to `request_url`; None where it may not lead (see the
        module's docstring)."""
        url = urljoin(request_url, location)
        if not may_lead_to(answers.registry, url):
            return None
        fields = {
            "url": url, "registry": answers.registry.name, "kind": answers.kind,
            "repository": answers.repository or "", "reference": answers.reference or "",
        }
        return REDIRECT_PATH + "?" + self._fields.query(fields, self._fields.now() + REDIRECT_LIFETIME)

    def target(self, path: str) -> SignedRedirect | None:
        """Where a redirect path of ours leads; None when we did not sign it or it expired."""
        fields = self._fields.verify(path.partition("?")[2])
        if fields is None:
            return None
        return SignedRedirect(fields.get("url", ""), fields.get("registry", ""), fields.get("kind", ""),
                              fields.get("repository") or None, fields.get("reference") or None)


def may_lead_to(registry: Registry, url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.scheme == "http" and registry.upstream.startswith("https:"):
        return False
    return is_local(registry.upstream) or not is_internal_host(parts.hostname)


@dataclass(frozen=True)
class Destination:
    """A redirect target's host as checked: where to connect (None: unresolvable, so mitmproxy
    fails to connect and answers 502), and whether it is, or resolves to, an internal address."""

    address: str | None
    internal: bool


async def resolve_destination(host: str) -> Destination:
    """The connection then goes to `address`, not to a second lookup of the name, which a DNS
    server could answer differently (DNS rebinding)."""
    if parse_ip(host) is not None:
        return Destination(host, is_internal_host(host))
    try:
        answers = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        answers = []
    addresses = [answer[4][0] for answer in answers]
    return Destination(addresses[0] if addresses else None, is_internal_host(host) or any(map(is_internal_host, addresses)))


def is_internal_host(host: str) -> bool:
    """`localhost`, or a loopback, link-local or unspecified address (IPv4-mapped too)."""
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = parse_ip(host)
    return address is not None and (address.is_loopback or address.is_link_local or address.is_unspecified)
