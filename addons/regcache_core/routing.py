"""Routing: which registry a client request is for, and whether we serve it at all.

Pure functions of the request line and headers; the mitmproxy addon only applies the answer.
The decision says *where* a request goes, never *how* its bytes move, so a faster byte path
can reuse it unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urlencode

from .config import Config, Registry

# Grammar from the distribution spec: path components joined by "/", at most 255 characters.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
_API_PATH = re.compile(r"/v2/(?P<repository>.+)/(?P<kind>manifests|blobs|tags|referrers)/(?P<reference>[^/]+)")
_KINDS = {"manifests": "manifest", "blobs": "blob", "tags": "tags", "referrers": "referrers"}
PULL_METHODS = ("GET", "HEAD")  # as sent: "get" is another method, which a backend may take for GET
HTTP1_VERSIONS = ("HTTP/1.0", "HTTP/1.1")  # what an HTTP/1 request line may say
MULTIPLEXED_VERSIONS = ("HTTP/2.0", "HTTP/3")  # framed streams (ALPN h2, h3): there is no request line
# Bounds checked before a request target is parsed: parsing a 7 MiB query of 2M fields took the
# event loop (every client) 4 s. Our own redirect paths, the longest targets clients send us,
# carry a CDN's signed URL of a few KiB.
MAX_TARGET = 16384  # characters of path and query
MAX_QUERY_FIELDS = 32


@dataclass(frozen=True)
class TagsPage:
    """The page of a tags list a client asked for with `?n=&last=` (the whole list without
    them): regcache cuts it from the list a cache answers (registry:2 2.8 ignores both)."""

    n: int | None  # at most this many tags
    last: str | None  # only tags after this one
    link_path: str  # the client's path and query without n and last, for the next page's Link


@dataclass(frozen=True)
class Target:
    """A request we serve: the registry it is for, and what it asks for."""

    registry: Registry
    kind: str  # ping | manifest | blob | tags | referrers
    repository: str | None
    reference: str | None  # tag or digest; None for ping and tags
    path: str  # what the backend is asked for: the client's path and query, without ns
    page: TagsPage | None = None  # for a cache's tags/list
    by_ns: bool = False  # routed by `?ns=`, not by Host: its answers name the registry (OCI-Namespace)

    @property
    def goes_upstream(self) -> bool:
        """Sent to the upstream itself, with our credentials: an uncached registry's requests, and
        referrers (OCI 1.1), which registry:2 2.8 as a cache does not know."""
        return self.registry.cache is None or self.kind == "referrers"

    @property
    def backend(self) -> str:
        return self.registry.upstream if self.goes_upstream else self.registry.backend


@dataclass(frozen=True)
class Refusal:
    """A request we answer ourselves, with an error in the registry's JSON format."""

    status: int
    code: str
    message: str
    challenge: str | None = None  # WWW-Authenticate of a 401: how to ask again
    close: bool = False  # end the connection after the answer: what follows on it can't be trusted

    def body(self) -> bytes:
        return json.dumps({"errors": [{"code": self.code, "message": self.message}]}).encode()


def upstream_unreachable(registry: Registry, reason: str, missing: str | None = None) -> Refusal:
    """The 503 for a request that needs `registry`'s upstream while it cannot be reached (`reason`);
    `missing`: the reference its cache does not hold, so that no user looks for a typo."""
    then = f", and the cache does not hold {missing}" if missing else "; regcache retries it in the background"
    return Refusal(503, "UNAVAILABLE", f"upstream {registry.upstream} of {registry.name} cannot be reached ({reason}){then}")


def store_unreachable(registry: Registry, where: str, reason: str) -> Refusal:
    """The 503 for a request that needs the object store `registry`'s cache keeps blobs in, while
    it cannot be reached: containerd then falls back to its next host."""
    return Refusal(503, "UNAVAILABLE", f"the object store {where} of {registry.name}'s cache cannot be reached "
                                       f"({reason}); regcache retries it in the background")


def refuse_malformed(method: str, http_version: str, target: str, has_body: bool, multiplexed: bool = False) -> Refusal | None:
    """What is wrong with a request whatever its path: checked first, on every listener, so that
    nothing after it meets an unknown protocol, an unbounded or non-ASCII target, or a pull with
    a body (a chunked body's trailers crash mitmproxy's connection handler).

    `multiplexed`: the connection speaks HTTP/2 or 3 (by ALPN). Otherwise the version is what an
    HTTP/1 request line claimed, and `GET / HTTP/2.0` there is no HTTP/2 request."""
    if http_version not in (MULTIPLEXED_VERSIONS if multiplexed else HTTP1_VERSIONS):
        return Refusal(400, "UNSUPPORTED", f"{_quote(http_version)} is not HTTP/1.0 or 1.1 on this connection", close=True)
    if len(target) > MAX_TARGET:
        return Refusal(414, "UNSUPPORTED", f"the request target is longer than {MAX_TARGET} characters")
    if not target.isascii():
        # RFC 3986: anything else is percent-encoded; mitmproxy hands raw bytes on as surrogates.
        return Refusal(400, "UNSUPPORTED", "the request target has bytes that are not ASCII; percent-encode them")
    if target.count("&") >= MAX_QUERY_FIELDS:
        return Refusal(400, "UNSUPPORTED", f"the query has more than {MAX_QUERY_FIELDS} fields")
    if has_body and method in PULL_METHODS:
        return Refusal(400, "UNSUPPORTED", f"a {method} has no body in the registry API", close=True)
    return None


def route(config: Config, method: str, host: str, path: str, proxy_form: bool = False) -> Target | Refusal:
    """Decide what to do with one request.

    `host` is the Host header as sent; `path` is the origin-form target with its query;
    `proxy_form` is true for CONNECT and absolute-form requests, which we never serve:
    regcache is not an open proxy.
    """
    if proxy_form or method == "CONNECT":
        return Refusal(400, "UNSUPPORTED", "regcache is a registry mirror, not a forward proxy")
    path_only, _, query = path.partition("?")
    if refusal := refuse_non_pull(method, path_only):
        return refusal
    params = parse_qsl(query, keep_blank_values=True)
    registry = select_registry(config, host, dict(params).get("ns", ""))
    if isinstance(registry, Refusal):
        return registry
    forward_path = with_query(path_only, [(k, v) for k, v in params if k != "ns"])
    target = parse_api_path(registry, path_only, forward_path)
    if isinstance(target, Target) and host_registry_name(config, host) is None:
        target = replace(target, by_ns=True)
    if isinstance(target, Target) and target.kind == "tags" and registry.cache is not None:
        return page_of_tags(target, path_only, params)
    return target


def page_of_tags(target: Target, path_only: str, params: list[tuple[str, str]]) -> Target | Refusal:
    """A cache's tags/list: the cache is asked for the whole list, which the answer is sorted
    (registry:2 2.8 does not sort it) and cut from (an upstream, asked directly, does both)."""
    fields = dict(params)
    n = fields.get("n")
    if n is not None and not (n.isascii() and n.isdigit() and len(n) <= 9):
        return Refusal(400, "PAGINATION_NUMBER_INVALID", f"n={_quote(n)} is not a number of tags")
    rest = [(k, v) for k, v in params if k not in ("n", "last")]
    page = TagsPage(int(n) if n is not None else None, fields.get("last"), with_query(path_only, rest))
    return replace(target, path=with_query(path_only, [(k, v) for k, v in rest if k != "ns"]), page=page)


def with_query(path: str, params: list[tuple[str, str]]) -> str:
    return path + (f"?{urlencode(params)}" if params else "")


def route_egress(registry: Registry, method: str, path: str) -> Target | Refusal:
    """Decide what to do with a request a cache sends to `registry`'s upstream, through us.

    Only what a pull-through cache needs passes; the caller answers a ping (`GET /v2/`) itself.
    """
    path_only = path.partition("?")[0]
    return refuse_non_pull(method, path_only) or parse_api_path(registry, path_only, path)


def refuse_non_pull(method: str, path_only: str) -> Refusal | None:
    if not (path_only == "/v2" or path_only.startswith("/v2/")):
        return Refusal(404, "UNSUPPORTED", f"{_quote(path_only)} is not a registry API path (/v2/...)")
    return refuse_method(method)


def refuse_method(method: str) -> Refusal | None:
    if method not in PULL_METHODS:
        return Refusal(405, "UNSUPPORTED", f"{_quote(method)} is not allowed: regcache serves pulls only (GET, HEAD)")
    return None


def host_registry_name(config: Config, host: str) -> str | None:
    """The registry name in a virtual host `<registry>.<domain>`; None for any other host."""
    hostname = strip_port(host).lower().rstrip(".")  # "name." is the same host as "name"
    suffix = "." + config.domain
    return hostname[: -len(suffix)] if hostname.endswith(suffix) else None


def select_registry(config: Config, host: str, ns: str) -> Registry | Refusal:
    """The registry named by the virtual host `<registry>.<domain>`, else by `?ns=`."""
    if (name := host_registry_name(config, host)) is not None:
        return config.registry(name) or Refusal(
            404, "NAME_UNKNOWN", f"registry {_quote(name)} (host {_quote(host)}) is not mapped by this regcache"
        )
    if ns:
        return config.registry(ns.lower()) or Refusal(
            404, "NAME_UNKNOWN", f"registry {_quote(ns)} (?ns= on host {_quote(host)}) is not mapped by this regcache"
        )
    return Refusal(
        404,
        "NAME_UNKNOWN",
        f"host {_quote(host)} names no registry: use <registry>.{config.domain} or add ?ns=<registry>",
    )


def parse_api_path(registry: Registry, path: str, forward_path: str) -> Target | Refusal:
    if path in ("/v2", "/v2/"):
        return Target(registry, "ping", None, None, forward_path)
    match = _API_PATH.fullmatch(path)
    if not match:
        return Refusal(404, "UNSUPPORTED", f"{_quote(path)} is not a pull API path (manifests, blobs, tags/list, referrers)")
    repository, kind, reference = match["repository"], _KINDS[match["kind"]], match["reference"]
    if len(repository) > 255:
        return Refusal(400, "NAME_INVALID", f"{_quote(repository)} is longer than 255 characters")
    if not REPOSITORY.fullmatch(repository):
        return Refusal(400, "NAME_INVALID", f"{_quote(repository)} is not a valid repository name")
    if not registry.serves(repository):
        # As if it did not exist: which repositories a private account can read is not for clients to probe.
        return Refusal(404, "NAME_UNKNOWN", f"repository {_quote(repository)} is not served for {registry.name} by this regcache")
    if kind == "tags":
        if reference != "list":
            return Refusal(404, "UNSUPPORTED", f"{_quote(path)} is not a pull API path (manifests, blobs, tags/list, referrers)")
        return Target(registry, kind, repository, None, forward_path)
    if ":" in reference or kind in ("blob", "referrers"):
        if not DIGEST.fullmatch(reference):
            return Refusal(400, "DIGEST_INVALID", f"{_quote(reference)} is not a sha256 or sha512 digest")
    elif not TAG.fullmatch(reference):
        # No manifest can have such a tag: the spec (and its conformance tests) want 404 for it.
        return Refusal(404, "MANIFEST_UNKNOWN", f"{_quote(reference)} is not a valid tag, so no manifest has it")
    return Target(registry, kind, repository, reference, forward_path)


def _quote(value: str, limit: int = 80) -> str:
    """A client's value, quoted for an error message and cut short: clients choose its length."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def strip_port(host: str) -> str:
    """`name:5000` -> `name`; `[::1]:5000` -> `::1`."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    # Only a numeric port: "a:5000, b" (two Host headers, joined) must not pass for host "a".
    return name if port.isascii() and port.isdigit() and ":" not in name else host


def short_reference(reference: str | None) -> str | None:
    """Digests shortened to the 12 hex digits people recognise; tags unchanged."""
    if reference and ":" in reference:
        algorithm, _, hex_digits = reference.partition(":")
        return f"{algorithm}:{hex_digits[:12]}"
    return reference
