"""Routing: which registry a client request is for, and whether we serve it at all.

Pure functions of the request line and headers; the mitmproxy addon only applies the answer.
The decision says *where* a request goes, never *how* its bytes move, so a faster byte path
can reuse it unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from .config import Config, Registry

# Grammar from the distribution spec: path components joined by "/", at most 255 characters.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
_API_PATH = re.compile(r"/v2/(?P<repository>.+)/(?P<kind>manifests|blobs|tags)/(?P<reference>[^/]+)")
_KINDS = {"manifests": "manifest", "blobs": "blob", "tags": "tags"}
PULL_METHODS = ("GET", "HEAD")


@dataclass(frozen=True)
class Target:
    """A request we serve: the registry it is for, and what it asks for."""

    registry: Registry
    kind: str  # ping | manifest | blob | tags
    repository: str | None
    reference: str | None  # tag or digest; None for ping and tags
    path: str  # what the backend is asked for: the client's path and query, without ns

    @property
    def backend(self) -> str:
        return self.registry.backend


@dataclass(frozen=True)
class Refusal:
    """A request we answer ourselves, with an error in the registry's JSON format."""

    status: int
    code: str
    message: str

    def body(self) -> bytes:
        return json.dumps({"errors": [{"code": self.code, "message": self.message}]}).encode()


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
    forward_query = urlencode([(k, v) for k, v in params if k != "ns"])
    forward_path = path_only + (f"?{forward_query}" if forward_query else "")
    return parse_api_path(registry, path_only, forward_path)


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
        return Refusal(405, "UNSUPPORTED", f"{method} is not allowed: regcache serves pulls only (GET, HEAD)")
    return None


def select_registry(config: Config, host: str, ns: str) -> Registry | Refusal:
    """The registry named by the virtual host `<registry>.<domain>`, else by `?ns=`."""
    hostname = strip_port(host).lower().rstrip(".")  # "name." is the same host as "name"
    suffix = "." + config.domain
    if hostname.endswith(suffix):
        name = hostname[: -len(suffix)]
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
        return Refusal(404, "UNSUPPORTED", f"{_quote(path)} is not a pull API path (manifests, blobs, tags/list)")
    repository, kind, reference = match["repository"], _KINDS[match["kind"]], match["reference"]
    if len(repository) > 255:
        return Refusal(400, "NAME_INVALID", f"{_quote(repository)} is longer than 255 characters")
    if not REPOSITORY.fullmatch(repository):
        return Refusal(400, "NAME_INVALID", f"{_quote(repository)} is not a valid repository name")
    if kind == "tags":
        if reference != "list":
            return Refusal(404, "UNSUPPORTED", f"{_quote(path)} is not a pull API path (manifests, blobs, tags/list)")
        return Target(registry, kind, repository, None, forward_path)
    if ":" in reference or kind == "blob":
        if not DIGEST.fullmatch(reference):
            return Refusal(400, "DIGEST_INVALID", f"{_quote(reference)} is not a sha256 or sha512 digest")
    elif not _TAG.fullmatch(reference):
        return Refusal(400, "TAG_INVALID", f"{_quote(reference)} is not a valid tag")
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
