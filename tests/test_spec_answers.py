"""spec_answers.py without a proxy: which backend answers are replaced, and which are left alone."""

from __future__ import annotations

import json

from regcache_core.config import DEFAULTS, parse_config
from regcache_core.routing import Target
from regcache_core.spec_answers import missing_manifest, registry2_manifest_unknown

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
