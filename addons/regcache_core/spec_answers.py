"""Backend answers brought in line with the OCI distribution spec, where registry:2 2.8 differs.

Plain functions of a request's Target and the backend's answer; the addon (mitm/spec_answers.py)
applies them.

- A cache answers a missing manifest by digest with 500 `UNKNOWN`, the real code hidden in its
  detail (`MANIFEST_UNKNOWN`); clients and conformance tools want 404 `MANIFEST_UNKNOWN`.
- A cache's tags list is not sorted, and it ignores `tags/list?n=&last=`: the answer is sorted
  and the page cut from it, with a `Link` header to the next page (RFC 5988, `rel="next"`)
  when there is one.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from .routing import Refusal, TagsPage, Target


def missing_manifest(target: Target, status: int, body: bytes | None, content_length: str | None) -> Refusal | None:
    """The 404 to give instead of a cache's 500 for a manifest by digest that it does not have.

    `body` is None for a HEAD, whose answer has none: the length registry:2 announces for it is
    that of the same error's body, which says what the error is.
    """
    if status != 500 or target.kind != "manifest" or ":" not in (target.reference or "") or target.registry.cache is None:
        return None
    if body is None:
        known = content_length == str(len(registry2_manifest_unknown(target.repository, target.reference)))
    else:
        known = "MANIFEST_UNKNOWN" in inner_error_codes(body)
    return Refusal(404, "MANIFEST_UNKNOWN", f"no manifest {target.reference} in {target.repository}") if known else None


def registry2_manifest_unknown(repository: str, digest: str) -> bytes:
    """The body registry:2 2.8 sends with its 500 for a missing manifest by digest (Go's
    json.Marshal: no spaces, then a newline)."""
    inner = {"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {"Name": repository, "Revision": digest}}
    outer = {"errors": [{"code": "UNKNOWN", "message": "unknown error", "detail": {"errors": [inner]}}]}
    return json.dumps(outer, separators=(",", ":")).encode() + b"\n"


def inner_error_codes(body: bytes) -> set[str]:
    """The codes of the errors nested in the details of a registry error body's errors."""
    try:
        errors = json.loads(body).get("errors", [])
        return {inner.get("code") for error in errors for inner in error.get("detail", {}).get("errors", [])}
    except (ValueError, AttributeError, TypeError):
        return set()


def tags_page(page: TagsPage, body: bytes) -> tuple[bytes, str | None] | None:
    """The page's body and its Link header value (None on the last page), cut from a cache's
    whole tags list; None when `body` is not a tags list. Tags are in lexical order, as the spec
    wants, and `last` itself is not on the page."""
    try:
        answer = json.loads(body)
        tags = sorted(tag for tag in answer.get("tags") or [] if isinstance(tag, str))
    except (ValueError, AttributeError, TypeError):
        return None
    if page.last is not None:
        tags = [tag for tag in tags if tag > page.last]
    link = None
    if page.n is not None:
        if 0 < page.n < len(tags):
            separator = "&" if "?" in page.link_path else "?"
            link = f'<{page.link_path}{separator}{urlencode({"n": page.n, "last": tags[page.n - 1]})}>; rel="next"'
        tags = tags[: page.n]
    return json.dumps({"name": answer.get("name"), "tags": tags}).encode(), link
