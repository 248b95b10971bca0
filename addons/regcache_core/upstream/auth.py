"""Upstream credentials: the Authorization header regcache sends to each upstream registry.

An upstream says how it wants to be asked in the `WWW-Authenticate` challenge of its
`GET /v2/` answer: Basic (send the configured user and password) or Bearer (fetch a token for
`repository:<name>:pull` from the challenge's realm, with the credentials if set, anonymously
otherwise). Tokens are kept in a diskcache store under the data folder, keyed by registry,
user and scope, until shortly before they expire; every request shares them and they survive a
restart. Concurrent requests for the same token wait for one fetch.

No mitmproxy here: the addon calls `authorization()` and `refused()`. Errors and log lines name
the registry and the variables to fix, never a secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import diskcache
from publicsuffix2 import get_sld

from ..config import Registry
from .client import NoAnswer, RedirectRefused

logger = logging.getLogger(__name__)

TIMEOUT = 15.0  # seconds for one token request
# GET /v2/ is tiny: a registry that does not answer it quickly is down. A failed lookup is
# remembered for a few seconds, so during an outage requests fail at once instead of each
# waiting out the timeout in turn (cached content is still served by the caches).
CHALLENGE_TIMEOUT = 5.0
CHALLENGE_RETRY_AFTER = 5.0
DEFAULT_TOKEN_LIFETIME = 60  # what the token protocol says when expires_in is missing
MAX_TOKEN_RESPONSE = 1 << 20
# auth-param = token "=" ( token / quoted-string ), RFC 9110 section 11.2
_AUTH_PARAM = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(?:,|$)')


class UpstreamAuthError(Exception):
    """No Authorization header could be made. `status` is what the requester should get;
    `unreachable` says why the upstream gave no answer, when that is the cause."""

    def __init__(self, status: int, message: str, unreachable: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.unreachable = unreachable


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic", "bearer", or "" when the upstream asks for nothing
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")


NO_CHALLENGE = Challenge("", {})


def parse_challenge(value: str) -> Challenge | None:
    """One `WWW-Authenticate` value, e.g. `Bearer realm="https://x/token",service="x"`.

    Returns None for a value that is not a Basic or Bearer challenge.
    """
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() not in ("basic", "bearer"):
        return None
    params, position = {}, 0
    while position < len(rest):
        match = _AUTH_PARAM.match(rest, position)
        if not match or match.end() == position:
            break  # a malformed tail; keep what parsed
        name, raw = match.groups()
        params[name.lower()] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        position = match.end()
    challenge = Challenge(scheme.lower(), params)
    if challenge.scheme == "bearer" and not challenge.realm.startswith(("https://", "http://")):
        return None  # nowhere to get a token from
    return challenge


def pick_challenge(values: list[str]) -> Challenge | None:
    """Bearer over Basic when an upstream offers both."""
    challenges = [c for c in map(parse_challenge, values) if c is not None]
    return next((c for c in challenges if c.scheme == "bearer"), challenges[0] if challenges else None)


def basic_authorization(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def pull_scope(repository: str | None) -> str | None:
    return f"repository:{repository}:pull" if repository else None


def cache_lifetime(expires_in: int) -> int:
    """How long a token stays in the store: until shortly before the upstream stops taking it."""
    return max(expires_in - min(30, expires_in // 5), 0)


def parse_token_response(body: bytes) -> tuple[str, int]:
    """(token, expires_in) from a token server's JSON answer; ValueError if it has no token."""
    answer = json.loads(body)
    token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
    if not isinstance(token, str) or not token:
        raise ValueError("the answer has no token")
    expires_in = answer.get("expires_in")
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = DEFAULT_TOKEN_LIFETIME
    return token, expires_in


def realm_allowed(registry: Registry, realm: str) -> bool:
    """A token realm that gets regcache's credentials may be on the upstream's own registrable domain (auth.docker.io for
    registry-1.docker.io, by the public suffix list; an address must be the same address) or on
    a host `K_TOKEN_REALMS` names: regcache sends its credentials there."""
    realm_host = (urlsplit(realm).hostname or "").rstrip(".").lower()
    upstream_host = (urlsplit(registry.upstream).hostname or "").rstrip(".").lower()
    if realm_host in registry.token_realms or realm_host == upstream_host:
        return True
    return not is_address(upstream_host) and get_sld(realm_host, strict=True) == get_sld(upstream_host, strict=True) is not None


def is_address(host: str) -> bool:
    return host.replace(".", "").isdigit() or ":" in host


class TokenStore:
    """Tokens on disk: a diskcache in a folder only our user can enter, its database mode 0600."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        database = directory / "cache.db"  # diskcache's file; SQLite gives its -wal/-shm files the same mode
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
        database.chmod(0o600)
        # Tokens stay inside the database: no value is big enough to get a file of its own.
        self._cache = diskcache.Cache(str(directory), disk_min_file_size=MAX_TOKEN_RESPONSE)

    def get(self, key: str) -> str | None:
        return self._cache.get(key)

    def put(self, key: str, token: str, lifetime: int) -> None:
        self._cache.set(key, token, expire=lifetime)

    def drop(self, key: str) -> None:
        self._cache.delete(key)

    def close(self) -> None:
        self._cache.close()


class UpstreamAuth:
    def __init__(self, store: TokenStore, fetch, on_token_fetch=lambda registry, outcome: None,
                 challenge_timeout: float = CHALLENGE_TIMEOUT, clock=time.monotonic) -> None:
        self.store = store
        # async (url, headers, timeout) -> (status, WWW-Authenticate values, body), raising
        # NoAnswer (UpstreamClient.get with its size cap)
        self._fetch = fetch
        self._challenge_timeout = challenge_timeout
        self._clock = clock
        self._on_token_fetch = on_token_fetch  # (registry name, "ok" | "denied" | "error"), for metrics
        self._challenges: dict[str, Challenge] = {}
        self._challenge_failures: dict[str, tuple[float, UpstreamAuthError]] = {}  # registry -> (retry time, error)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (its lock, tasks holding or awaiting it)
        self._refused: set[str] = set()  # registries whose refusal was logged, until they accept again
        # registry -> key of the last token fetched with its credentials, until an answer to it
        # arrives (one per registry, so it stays small even when answers never come)
        self._fresh_tokens: dict[str, str] = {}

    async def authorization(self, registry: Registry, repository: str | None) -> str | None:
        """The Authorization value for a pull request to `registry`'s upstream, or None."""
        challenge = await self._challenge(registry)
        if challenge.scheme == "basic":
            return basic_authorization(registry.username, registry.password) if registry.username else None
        if challenge.scheme == "bearer":
            return "Bearer " + await self._token(registry, challenge, pull_scope(repository))
        return None

    def refused(self, registry: Registry, repository: str | None) -> None:
        """The upstream answered 401 to what we sent: forget the scope's token, so the next
        request asks afresh.

        Docker Hub also answers 401 for a repository that does not exist or is private, so the
        credentials are blamed (one log line, and the challenge is learnt again) only when
        nothing else can be meant: the 401 answers Basic authentication, or a token fetched
        with the credentials for this scope and not yet used successfully.
        """
        key = _token_key(registry, pull_scope(repository))
        self.store.drop(key)
        fresh = self._fresh_tokens.get(registry.name) == key
        if fresh:
            del self._fresh_tokens[registry.name]
        challenge = self._challenges.get(registry.name)
        if fresh or (challenge is not None and challenge.scheme == "basic"):
            self._challenges.pop(registry.name, None)
            what = f"a token fetched with regcache's credentials for {repository}" if fresh else "Basic authentication"
            self._report_refusal(registry, f"{registry.upstream} answered 401 Unauthorized to {what}")

    def accepted(self, registry: Registry, repository: str | None) -> None:
        self._refused.discard(registry.name)
        if self._fresh_tokens.get(registry.name) == _token_key(registry, pull_scope(repository)):
            del self._fresh_tokens[registry.name]

    async def _challenge(self, registry: Registry) -> Challenge:
        if (known := self._challenges.get(registry.name)) is not None:
            return known
        async with self._exclusive("challenge " + registry.name):
            if (known := self._challenges.get(registry.name)) is not None:
                return known
            failure = self._challenge_failures.get(registry.name)
            if failure and self._clock() < failure[0]:
                raise UpstreamAuthError(failure[1].status, str(failure[1]), failure[1].unreachable)
            try:
                known = self._challenges[registry.name] = await self._learn_challenge(registry)
            except UpstreamAuthError as e:
                self._challenge_failures[registry.name] = (self._clock() + CHALLENGE_RETRY_AFTER, e)
                raise
            self._challenge_failures.pop(registry.name, None)
            return known

    async def _learn_challenge(self, registry: Registry) -> Challenge:
        try:
            status, challenges, _ = await self._fetch(registry.upstream + "/v2/", {}, self._challenge_timeout)
        except NoAnswer as e:
            if e.answered:  # something answered, but not in HTTP: the upstream is there, and broken
                raise UpstreamAuthError(502, f"upstream {registry.upstream} of {registry.name} is unreachable: {e.reason}") from None
            raise UpstreamAuthError(503, f"upstream {registry.upstream} of {registry.name} cannot be reached ({e.reason})",
                                    e.reason) from None
        if status != 401:
            return NO_CHALLENGE
        challenge = pick_challenge(challenges)
        if challenge is None:
            raise UpstreamAuthError(502, f"upstream {registry.upstream} of {registry.name} asks for an unsupported kind of authentication")
        if challenge.scheme == "bearer" and registry.upstream.startswith("https:") and not challenge.realm.startswith("https:"):
            # Credentials (and the token) would cross the network in the clear.
            raise UpstreamAuthError(502, f"upstream {registry.upstream} of {registry.name} names a token realm"
                                         f" over plain http ({_without_query(challenge.realm)}); regcache asks https realms only")
        if challenge.scheme == "bearer" and registry.username and not realm_allowed(registry, challenge.realm):
            raise UpstreamAuthError(502, f"upstream {registry.upstream} of {registry.name} names a token realm on another"
                                         f" domain ({_without_query(challenge.realm)}); list its host in {registry.key}_TOKEN_REALMS"
                                         " if regcache may send its credentials there")
        return challenge

    async def _token(self, registry: Registry, challenge: Challenge, scope: str | None) -> str:
        key = _token_key(registry, scope)
        async with self._exclusive(key):
            if token := await asyncio.to_thread(self.store.get, key):
                return token
            token, expires_in = await self._fetch_token(registry, challenge, scope)
            await asyncio.to_thread(self.store.put, key, token, cache_lifetime(expires_in))
            if registry.username:
                self._fresh_tokens[registry.name] = key
            return token

    async def _fetch_token(self, registry: Registry, challenge: Challenge, scope: str | None) -> tuple[str, int]:
        query = {"service": challenge.service} if challenge.service else {}
        if scope:
            query["scope"] = scope
        headers = {}
        if registry.username:
            query["account"] = registry.username
            headers["Authorization"] = basic_authorization(registry.username, registry.password)
        url = challenge.realm + ("&" if "?" in challenge.realm else "?") + urlencode(query)
        realm = _without_query(challenge.realm)
        try:
            status, _, body = await self._fetch(url, headers, TIMEOUT)
        except RedirectRefused as e:
            self._on_token_fetch(registry.name, "error")
            raise UpstreamAuthError(502, f"token server {realm} of {registry.name} {e.reason}: not followed, so"
                                         " regcache's credentials stay with the realm's host") from None
        except NoAnswer as e:
            self._on_token_fetch(registry.name, "error")
            raise UpstreamAuthError(502, f"token server {realm} of {registry.name} is unreachable: {e.reason}") from None
        if status in (401, 403):
            self._on_token_fetch(registry.name, "denied")
            self._report_refusal(registry, f"token server {realm} answered {status}")
            raise UpstreamAuthError(401, f"token server {realm} refused regcache's credentials for {registry.name}")
        try:
            if status != 200:
                raise ValueError(f"HTTP {status}")
            token = parse_token_response(body)
        except ValueError as e:  # JSONDecodeError is a ValueError
            self._on_token_fetch(registry.name, "error")
            raise UpstreamAuthError(502, f"token server {realm} of {registry.name} gave no token ({e})") from None
        self._on_token_fetch(registry.name, "ok")
        self._refused.discard(registry.name)
        return token

    def _report_refusal(self, registry: Registry, what: str) -> None:
        if registry.name in self._refused:
            return  # one line per registry until it accepts again
        self._refused.add(registry.name)
        if registry.username:
            hint = f"check {registry.key}_USERNAME and {registry.key}_PASSWORD"
        else:
            hint = f"no credentials are set; set {registry.key}_USERNAME and {registry.key}_PASSWORD if it needs them"
        logger.warning("upstream %s refused regcache: %s; %s", registry.name, what, hint)

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: str):
        """One fetch per key at a time. A key's lock goes when nobody holds or awaits it, so
        clients naming ever new repositories cannot grow the table."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _without_query(url: str) -> str:
    """A URL for messages: its query may carry anything."""
    return urlsplit(url)._replace(query="").geturl()


def _token_key(registry: Registry, scope: str | None) -> str:
    return f"{registry.name} {registry.username} {scope or ''}"
