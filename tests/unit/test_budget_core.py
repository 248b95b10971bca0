"""The disk budget's plain parts on a registry:2 storage layout written here: scan, choice of
blobs, removal of links and manifests, the usage store, free-space checks and settings."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from regcache_core.budget.disk import DiskWatch, disk_state
from regcache_core.budget.enforce import CacheResult, summary
from regcache_core.budget.eviction import CacheDisk, Evicted, apply, choose
from regcache_core.budget.storage import blob_dir, scan
from regcache_core.budget.usage import UsageStore
from regcache_core.config import DEFAULTS, ConfigError, parse_config

V2 = "docker/registry/v2"


def put_blob(root, content: bytes, mtime: float) -> str:
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    folder = blob_dir(root, digest)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").write_bytes(content)
    os.utime(folder / "data", (mtime, mtime))
    return digest


def link(path, digest: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "link").write_text(digest)


def put_image(root, repository: str, tag: str, layer_sizes: list[int], mtime: float) -> tuple[str, list[str]]:
    """An image as registry:2 stores a pulled one: blobs, layer links, a manifest revision and a tag."""
    blobs = [put_blob(root, os.urandom(size), mtime) for size in layer_sizes]
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": blobs[0]},
                           "layers": [{"digest": d} for d in blobs[1:]]}).encode()
    manifest_digest = put_blob(root, manifest, mtime)
    repo = root / V2 / "repositories" / repository
    for digest in blobs:
        link(repo / "_layers" / "sha256" / digest.split(":")[1], digest)
    link(repo / "_manifests/revisions/sha256" / manifest_digest.split(":")[1], manifest_digest)
    link(repo / f"_manifests/tags/{tag}/current", manifest_digest)
    link(repo / f"_manifests/tags/{tag}/index/sha256" / manifest_digest.split(":")[1], manifest_digest)
    return manifest_digest, blobs


def never_busy(registry: str, digest: str) -> bool:
    return False


def test_scan_finds_nested_repositories_tags_and_counts_every_file(tmp_path):
    manifest, blobs = put_image(tmp_path, "library/small", "1.0", [10, 1000], 100)
    (tmp_path / V2 / "repositories/library/small/_uploads/x").mkdir(parents=True)
    (tmp_path / V2 / "repositories/library/small/_uploads/x/data").write_bytes(b"p" * 500)
    storage = scan(tmp_path)
    repository = storage.repositories["library/small"]
    assert repository.layers == set(blobs) and repository.manifests == {manifest}
    assert repository.tags == {"1.0": manifest} and storage.references(manifest) == set(blobs)
    assert storage.total == sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())


def test_least_recently_used_image_goes_whole_with_its_links_manifest_and_tag(tmp_path):
    old_manifest, old_blobs = put_image(tmp_path, "library/old", "1", [10, 5000], 100)
    new_manifest, new_blobs = put_image(tmp_path, "library/new", "1", [10, 5000], 200)
    cache = CacheDisk("docker.io", scan(tmp_path), budget=8000, last_use={old_blobs[1]: 150})
    choose([cache], None, never_busy)
    assert set(cache.evict) == set(old_blobs)
    evicted = apply(cache, never_busy)
    assert (evicted.blobs, evicted.bytes) == (3, 5010 + cache.storage.blobs[new_manifest].size)  # same-sized manifests
    after = scan(tmp_path)
    assert set(after.blobs) == {*new_blobs, new_manifest}
    assert "library/old" not in after.repositories  # not a link or tag left
    assert after.repositories["library/new"].tags == {"1": new_manifest}


def test_a_recorded_pull_outranks_an_older_store_and_busy_blobs_stay(tmp_path):
    a_manifest, a_blobs = put_image(tmp_path, "a", "1", [3000], 100)
    b_manifest, b_blobs = put_image(tmp_path, "b", "1", [3000], 200)
    storage = scan(tmp_path)
    cache = CacheDisk("docker.io", storage, budget=5000, last_use={a_blobs[0]: 300})  # a pulled after b was stored
    choose([cache], None, never_busy)
    assert cache.evict == b_blobs
    busy = CacheDisk("docker.io", storage, budget=5000, last_use={a_blobs[0]: 300})
    choose([busy], None, lambda registry, digest: digest == b_blobs[0])
    assert busy.evict == a_blobs and busy.skipped == {b_blobs[0]}


def test_a_blob_a_pull_began_reading_after_the_choice_stays_and_counts_as_skipped(tmp_path):
    _, blobs = put_image(tmp_path, "a", "1", [3000], 100)
    cache = CacheDisk("docker.io", scan(tmp_path), budget=1000, last_use={})
    choose([cache], None, never_busy)
    assert cache.evict == blobs and not cache.skipped
    evicted = apply(cache, lambda registry, digest: digest == blobs[0])
    assert evicted.blobs == 0 and cache.skipped == {blobs[0]}
    assert blobs[0] in scan(tmp_path).blobs


def test_the_runs_line_says_how_many_blobs_being_read_were_left():
    results = [CacheResult("docker.io", Evicted(3, 300 << 20), 250 << 20, None, skipped=2),
               CacheResult("ghcr.io", Evicted(0, 0), 10 << 20, None, skipped=1)]
    assert summary(results, 300 << 20) == (
        "regcache: disk budget: evicted docker.io: 3 blobs, 300.0 MiB, now 250.0 MiB, 2 being read left for a later "
        "run (all caches 260.0 MiB of REGCACHE_MAX_DISK 300.0 MiB)")


def test_a_blob_shared_by_two_repositories_loses_both_links(tmp_path):
    _, blobs = put_image(tmp_path, "one", "1", [4000], 100)
    link(tmp_path / V2 / "repositories/two/_layers/sha256" / blobs[0].split(":")[1], blobs[0])
    cache = CacheDisk("docker.io", scan(tmp_path), budget=1000, last_use={})
    choose([cache], None, never_busy)
    apply(cache, never_busy)
    after = scan(tmp_path)
    assert not after.blobs and "two" not in after.repositories


def test_total_budget_evicts_across_caches_least_recently_used_first(tmp_path):
    _, hub_blobs = put_image(tmp_path / "hub", "a", "1", [3000], 100)
    _, ghcr_blobs = put_image(tmp_path / "ghcr", "b", "1", [3000], 200)
    caches = [CacheDisk("docker.io", scan(tmp_path / "hub"), None, {}),
              CacheDisk("ghcr.io", scan(tmp_path / "ghcr"), None, {})]
    choose(caches, 5000, never_busy)
    assert (caches[0].evict, caches[1].evict) == (hub_blobs, [])


def test_usage_store_keeps_the_latest_use_per_blob(tmp_path):
    store = UsageStore(tmp_path / "usage.sqlite")
    store.record([("docker.io", "a", "sha256:1", "blob", 20), ("docker.io", "a", "sha256:1", "blob", 10)])
    store.record([("docker.io", "b", "sha256:1", "blob", 15), ("docker.io", "a", "1.0", "manifest", 12)])
    assert store.blob_last_use("docker.io") == {"sha256:1": 20}
    assert store.last_pulls("docker.io") == {("a", "1.0"): 12}
    assert store.blob_last_use("ghcr.io") == {}


def test_disk_state_and_one_warning_per_episode(tmp_path, capsys):
    assert disk_state(tmp_path / "not" / "made" / "yet", 0) == "ok"
    assert "under REGCACHE_MIN_FREE_DISK" in disk_state(tmp_path, 1 << 60)
    watch = DiskWatch(1 << 60)
    for _ in range(3):
        watch.check("docker.io", tmp_path)
    watch.min_free = 0
    watch.check("docker.io", tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "cannot store new content" in lines[0] and "room again" in lines[1]


def test_budget_settings():
    config = parse_config({**DEFAULTS, "REGCACHE_MAX_DISK": "50G", "DOCKERHUB_MAX_DISK": "512M"})
    assert config.max_disk == 50 << 30 and config.registry("docker.io").max_disk == 512 << 20
    assert config.registry("ghcr.io").max_disk is None and config.min_free_disk == 1 << 30
    assert parse_config(DEFAULTS).max_disk is None
    with pytest.raises(ConfigError, match="DOCKERHUB_MAX_DISK: 'lots' is not a size"):
        parse_config({**DEFAULTS, "DOCKERHUB_MAX_DISK": "lots"})
    with pytest.raises(ConfigError, match="REGCACHE_MAX_DISK: '0' is no room"):
        parse_config({**DEFAULTS, "REGCACHE_MAX_DISK": "0"})
