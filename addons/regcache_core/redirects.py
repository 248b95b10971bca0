"""Upstream redirects (a blob GET answered with 307 to a CDN), followed through regcache.

The Location an upstream gives is replaced by a path on the listener the request came in on,
carrying the target URL and an HMAC of it under a key that lives only in this process. A
request for that path goes to the target, without our Authorization header, so the bytes pass
through (and are seen by) the proxy. Only targets we signed are followed: the path cannot be
used to make regcache fetch any other URL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

REDIRECT_PATH = "/_regcache/redirect"


def is_redirect_path(path: str) -> bool:
    return path.partition("?")[0] == REDIRECT_PATH


class RedirectSigner:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def location(self, request_url: str, location: str) -> str | None:
        """Our Location for an upstream's `location` answering `request_url`; None if it is no http(s) URL."""
        target = urljoin(request_url, location)
        if urlsplit(target).scheme not in ("http", "https"):
            return None
        return REDIRECT_PATH + "?" + urlencode({"url": target, "sig": self._sign(target)})

    def target(self, path: str) -> str | None:
        """The URL a redirect path of ours leads to; None when the path was not signed by us."""
        params = dict(parse_qsl(path.partition("?")[2]))
        target, signature = params.get("url", ""), params.get("sig", "")
        # Bytes: compare_digest refuses str with non-ASCII characters, which clients choose.
        if target and hmac.compare_digest(signature.encode(), self._sign(target).encode()):
            return target
        return None

    def _sign(self, target: str) -> str:
        return hmac.new(self._key, target.encode(), hashlib.sha256).hexdigest()
