"""Redirect targets resolved by name: the e2e lane's /etc/hosts names a test host, and its network
namespace has no resolver to ask. The redirect policy itself is in
tests/unit/test_redirects_and_hits.py."""

from __future__ import annotations

import asyncio

from regcache_core.upstream.redirects import Destination, resolve_destination


def test_names_are_resolved_when_a_redirect_is_followed():
    assert asyncio.run(resolve_destination("localhost")).internal
    assert asyncio.run(resolve_destination("127.0.0.2")) == Destination("127.0.0.2", True)
    assert asyncio.run(resolve_destination("10.1.2.3")) == Destination("10.1.2.3", False)
    assert asyncio.run(resolve_destination("docker.io.regcache.test")) == Destination("127.0.0.1", True)  # conftest's /etc/hosts
    # unresolvable: the connection fails instead
    assert asyncio.run(resolve_destination("name.invalid")) == Destination(None, False)
