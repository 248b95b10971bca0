"""Signed fields in a URL query: an HMAC-SHA256 over every field, an expiry time among them.

Shared by the redirect paths the proxy follows (redirects.py) and the data plane's grants
(dataplane/grants.py): both hand a client a URL that must lead only where regcache said, and
only for a few minutes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from urllib.parse import parse_qsl, urlencode

_TIME = re.compile(r"[0-9]{1,12}")


class FieldSigner:
    def __init__(self, key: bytes, clock=time.time) -> None:
        self._key = key
        self._clock = clock

    def now(self) -> int:
        return int(self._clock())

    def query(self, fields: dict[str, str], expires: int) -> str:
        """`fields` and `exp` (unix seconds), with `sig` over all of them, as a URL query."""
        fields = {**fields, "exp": str(expires)}
        return urlencode({**fields, "sig": self._sign(fields)})

    def verify(self, query: str) -> dict[str, str] | None:
        """The fields of a query we signed, `exp` included; None when the signature does not
        match or the expiry has passed."""
        fields = dict(parse_qsl(query, keep_blank_values=True))
        signature = fields.pop("sig", "")
        # Bytes: compare_digest refuses str with non-ASCII characters, which clients choose.
        if not hmac.compare_digest(signature.encode(), self._sign(fields).encode()):
            return None
        expires = fields.get("exp", "")
        if not _TIME.fullmatch(expires) or int(expires) < self._clock():
            return None
        return fields

    def _sign(self, fields: dict[str, str]) -> str:
        return hmac.new(self._key, urlencode(sorted(fields.items())).encode(), hashlib.sha256).hexdigest()
