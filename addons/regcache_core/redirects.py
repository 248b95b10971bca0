"""Upstream redirects (a blob GET answered with 307 to a CDN), followed through regcache.

The Location an upstream gives is replaced by a path on the listener the request came in on,
carrying the target URL, an expiry time and an HMAC of both under a key that lives only in
this process. A GET or HEAD of that path goes to the target, without our Authorization header,
so the bytes pass through (and are seen by) the proxy. Only targets we signed, and only for a
few minutes, are followed: the path cannot be used to make regcache fetch any other URL, or a
URL it signed long ago.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

REDIRECT_PATH = "/_regcache/redirect"
REDIRECT_LIFETIME = 300  # seconds a signed redirect path can be followed; clients follow at once
_TIME = re.compile(r"[0-9]{1,12}")


def is_redirect_path(path: str) -> bool:
    return path.partition("?")[0] == REDIRECT_PATH


class RedirectSigner:
    def __init__(self, key: bytes | None = None, clock=time.time) -> None:
        self._key = key or secrets.token_bytes(32)
        self._clock = clock

    def location(self, request_url: str, location: str) -> str | None:
        """Our Location for an upstream's `location` answering `request_url`; None if it is no http(s) URL."""
        target = urljoin(request_url, location)
        if urlsplit(target).scheme not in ("http", "https"):
            return None
        fields = {"url": target, "exp": str(int(self._clock()) + REDIRECT_LIFETIME)}
        return REDIRECT_PATH + "?" + urlencode({**fields, "sig": self._sign(fields)})

    def target(self, path: str) -> str | None:
        """The URL a redirect path of ours leads to; None when we did not sign it or it expired."""
        fields = dict(parse_qsl(path.partition("?")[2], keep_blank_values=True))
        signature = fields.pop("sig", "")
        # Bytes: compare_digest refuses str with non-ASCII characters, which clients choose.
        if not hmac.compare_digest(signature.encode(), self._sign(fields).encode()):
            return None
        expires = fields.get("exp", "")
        if not _TIME.fullmatch(expires) or int(expires) < self._clock():
            return None
        return fields.get("url") or None

    def _sign(self, fields: dict[str, str]) -> str:
        return hmac.new(self._key, urlencode(sorted(fields.items())).encode(), hashlib.sha256).hexdigest()
