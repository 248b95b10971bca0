"""Only a registry's own cache may use its egress listener."""

from __future__ import annotations

import asyncio

from regcache_core.config import Registry
from regcache_core.access.egress import EgressGuard, normalize

NATIVE = Registry("DOCKERHUB", "docker.io", "https://registry-1.docker.io", "http://127.0.0.1:5001")
BY_NAME = Registry("GHCR", "ghcr.io", "https://ghcr.io", "http://localhost:5002")
UNRESOLVABLE = Registry("QUAY", "quay.io", "https://quay.io", "http://cache.invalid:5000")
UNCACHED = Registry("K8S", "registry.k8s.io", "https://registry.k8s.io", None)


def allows(guard: EgressGuard, registry: Registry, client: str) -> bool:
    return asyncio.run(guard.allows(registry, client))


def test_the_cache_address_is_allowed_and_others_are_not():
    guard = EgressGuard()
    assert allows(guard, NATIVE, "127.0.0.1")
    assert allows(guard, NATIVE, "::ffff:127.0.0.1")  # a dual-stack listener's spelling
    assert not allows(guard, NATIVE, "10.0.0.7")


def test_loopback_addresses_are_one_when_the_cache_is_on_loopback():
    """REGCACHE_EGRESS_HOST=:: makes a cache at 127.0.0.1 connect from ::1."""
    guard = EgressGuard()
    assert allows(guard, NATIVE, "::1") and allows(guard, NATIVE, "127.0.0.2")
    guard._known["cache.example"] = (0.0, frozenset({"10.0.0.9"}))
    in_compose = Registry("K8S", "registry.k8s.io", "https://registry.k8s.io", "http://cache.example:5000")
    assert not allows(guard, in_compose, "::1") and not allows(guard, in_compose, "127.0.0.1")


def test_a_cache_named_by_host_name_is_looked_up():
    assert allows(EgressGuard(), BY_NAME, "127.0.0.1")


def test_an_unresolvable_cache_or_an_uncached_registry_allows_nobody():
    guard = EgressGuard()
    assert not allows(guard, UNRESOLVABLE, "127.0.0.1")
    assert not allows(guard, UNCACHED, "127.0.0.1")


def test_answers_are_looked_up_again_after_the_ttl():
    now = [0.0]
    guard = EgressGuard(ttl=30, clock=lambda: now[0])
    guard._known["127.0.0.1"] = (0.0, frozenset({"10.0.0.9"}))  # what an earlier lookup said
    assert allows(guard, NATIVE, "10.0.0.9")
    now[0] = 31.0
    assert not allows(guard, NATIVE, "10.0.0.9") and allows(guard, NATIVE, "127.0.0.1")


def test_normalize():
    assert normalize("::ffff:10.0.0.5") == "10.0.0.5"
    assert normalize("fe80::1%eth0") == "fe80::1"
    assert normalize("not an address") == "not an address"
