"""spec_answers.py without a proxy: which backend answers are replaced, and which are left alone."""

from __future__ import annotations

import json

from regcache_core.config import DEFAULTS, parse_config
from regcache_core.routing import TagsPage, Target
from regcache_core.spec_answers import missing_manifest, registry2_manifest_unknown, tags_page

CONFIG = parse_config({**DEFAULTS, "REGISTRY_DOMAIN": "regcache.test", "GHCR_CACHE": "none"})
DIGEST = "sha256:" + "ab" * 32
BY_DIGEST = Target(CONFIG.registry("docker.io"), "manifest", "library/small", DIGEST, "")
OTHER_500 = json.dumps({"errors": [{"code": "UNKNOWN", "message": "unknown error", "detail": "connection refused"}]}).encode()


def test_the_caches_500_for_a_missing_manifest_becomes_404_for_get_and_head():
    body = registry2_manifest_unknown("library/small", DIGEST)
    for answer in (missing_manifest(BY_DIGEST, 500, body, None), missing_manifest(BY_DIGEST, 500, None, str(len(body)))):
        assert (answer.status, answer.code) == (404, "MANIFEST_UNKNOWN")


def test_other_500s_and_other_requests_are_left_alone():
    body = registry2_manifest_unknown("library/small", DIGEST)
    by_tag = Target(CONFIG.registry("docker.io"), "manifest", "library/small", "1.0", "")
    uncached = Target(CONFIG.registry("ghcr.io"), "manifest", "library/small", DIGEST, "")
    assert missing_manifest(BY_DIGEST, 500, OTHER_500, None) is None
    assert missing_manifest(BY_DIGEST, 500, None, str(len(OTHER_500))) is None
    assert missing_manifest(BY_DIGEST, 500, b"not json", None) is None
    assert missing_manifest(by_tag, 500, body, None) is None
    assert missing_manifest(uncached, 500, body, None) is None
    assert missing_manifest(BY_DIGEST, 502, body, None) is None


def test_a_tags_page_is_sorted_cut_after_last_and_links_the_next_page():
    body = json.dumps({"name": "x", "tags": ["b", "a", "C", "10", "1"]}).encode()
    page = lambda n, last: tags_page(TagsPage(n, last, "/v2/x/tags/list"), body)
    assert page(None, None) == (b'{"name": "x", "tags": ["1", "10", "C", "a", "b"]}', None)
    assert page(2, None)[1] == '</v2/x/tags/list?n=2&last=10>; rel="next"'
    assert page(2, "C") == (b'{"name": "x", "tags": ["a", "b"]}', None)  # exactly the rest: no next page
    assert page(0, None) == (b'{"name": "x", "tags": []}', None)
    assert tags_page(TagsPage(1, None, "/v2/x/tags/list"), b'{"name": "x", "tags": null}') == (b'{"name": "x", "tags": []}', None)
    assert tags_page(TagsPage(1, None, "/v2/x/tags/list"), b"<html>") is None
