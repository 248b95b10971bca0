"""K_STORAGE=s3://BUCKET/PREFIX and the AWS SDK's variables, as config reads them and as
`regcache up` hands them to registry:2: its s3 driver's config, and the keys in its environment
only (never the config file, never AWS_CA_BUNDLE, with which registry:2 2.8 panics)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from regcache_core.config import DEFAULTS, ConfigError, ObjectStore, parse_config
from regcache_core.stack.caches import cache_environment, local_backends, registry_config

S3 = {"DOCKERHUB_STORAGE": "s3://team-cache/regcache/hub/", "AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRET"}


def parse(**changes: str):
    return parse_config({**DEFAULTS, **changes})


def test_an_s3_url_is_an_object_store_and_the_sdk_variables_say_how_to_reach_it():
    config = parse(**S3, AWS_ENDPOINT_URL="http://127.0.0.1:9000", AWS_ENDPOINT_URL_S3="https://s3.internal:8333")
    hub = config.registry("docker.io")
    assert (hub.storage, hub.object_store) == (None, ObjectStore("team-cache", "regcache/hub"))
    assert hub.object_store.key("docker/registry/v2/x") == "regcache/hub/docker/registry/v2/x"
    assert str(hub.object_store) == "s3://team-cache/regcache/hub"
    assert (config.s3.endpoint, config.s3.region, config.s3.redirect) == ("https://s3.internal:8333", "us-east-1", False)
    assert "SECRET" not in repr(config)
    assert parse(**S3, AWS_ENDPOINT_URL="http://127.0.0.1:9000").s3.endpoint == "http://127.0.0.1:9000"
    assert parse(**S3, AWS_REGION="eu-west-3").s3.describe() == "AWS S3 (eu-west-3)"
    assert parse(DOCKERHUB_STORAGE="s3://team-cache").registry("docker.io").object_store.key("a") == "a"
    # A path stays a path: the data plane reads such a cache's files.
    assert parse(DOCKERHUB_STORAGE="/caches/hub").registry("docker.io").storage == Path("/caches/hub")


@pytest.mark.parametrize("changes, message", [
    ({"DOCKERHUB_STORAGE": "s3://Team_Cache/x"}, "DOCKERHUB_STORAGE: 'Team_Cache' is not an S3 bucket name"),
    ({"DOCKERHUB_STORAGE": "s3://ab"}, "DOCKERHUB_STORAGE: 'ab' is not an S3 bucket name"),
    ({"DOCKERHUB_STORAGE": "s3://bucket/a b"}, "DOCKERHUB_STORAGE: 'a b' is not a key prefix"),
    ({"DOCKERHUB_STORAGE": "s3://bucket/x", "DOCKERHUB_CACHE": "http://cache.example:5000"},
     "DOCKERHUB_STORAGE: s3:// is for a cache `regcache up` runs"),
    ({"AWS_ENDPOINT_URL_S3": "http://key:secret@s3.example"}, "AWS_ENDPOINT_URL_S3: has '@' in it"),
    ({"AWS_REGION": "EU WEST"}, "AWS_REGION: 'EU WEST' is not a region name"),
    ({"REGCACHE_S3_REDIRECT": "maybe"}, "REGCACHE_S3_REDIRECT: 'maybe' is not true or false"),
    ({"AWS_SESSION_TOKEN": "TOKEN"}, "AWS_SESSION_TOKEN: set without AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ({"REGCACHE_S3_COPIES_MAX_DISK": "lots"}, "REGCACHE_S3_COPIES_MAX_DISK:"),
])
def test_bad_object_store_settings_are_named(changes, message):
    with pytest.raises(ConfigError) as raised:
        parse(**changes)
    assert str(raised.value).startswith(message)


def test_registry2_gets_its_s3_driver_and_the_keys_in_its_environment_only(monkeypatch):
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/bundle.pem")
    config = parse(**S3, AWS_ENDPOINT_URL_S3="http://127.0.0.1:8333", REGCACHE_REGISTRIES="DOCKERHUB,GHCR")
    hub, ghcr = local_backends(config)
    storage = registry_config(hub)["storage"]
    assert storage["s3"] == {"bucket": "team-cache", "region": "us-east-1", "rootdirectory": "/regcache/hub",
                             "regionendpoint": "http://127.0.0.1:8333", "secure": False}
    assert storage["redirect"] == {"disable": True}  # regcache decides how warm blobs go
    assert "SECRET" not in repr(registry_config(hub))
    assert cache_environment(hub) == {
        "PATH": os.environ["PATH"], "REGISTRY_STORAGE_S3_ACCESSKEY": "AKID", "REGISTRY_STORAGE_S3_SECRETKEY": "SECRET"}
    assert cache_environment(ghcr) == {"PATH": os.environ["PATH"]}
    assert registry_config(ghcr)["storage"]["filesystem"] == {"rootdirectory": str(ghcr.storage)}
    # 2.8's upload purger panics on a store that lists empty folders (SeaweedFS): off on a store only.
    assert storage["maintenance"]["uploadpurging"] == {"enabled": False}
    assert registry_config(ghcr)["storage"]["maintenance"]["uploadpurging"]["enabled"] is True


def test_without_keys_registry2_uses_the_sdk_chain_and_aws_s3_itself():
    config = parse(DOCKERHUB_STORAGE="s3://team-cache/hub", AWS_REGION="eu-west-3")
    [hub, *_] = local_backends(config)
    assert registry_config(hub)["storage"]["s3"] == {
        "bucket": "team-cache", "region": "eu-west-3", "rootdirectory": "/hub"}
    assert set(cache_environment(hub)) == {"PATH"}


def test_a_session_token_reaches_registry2_with_its_keys_in_the_sdk_variables_it_reads():
    """registry:2 2.8's s3 driver has no `sessiontoken` key: with none in its config, its credential
    chain reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN."""
    config = parse(**S3, AWS_SESSION_TOKEN="TOKEN")
    [hub, *_] = local_backends(config)
    assert config.s3.session_token == "TOKEN" and "TOKEN" not in repr(config)
    assert "TOKEN" not in repr(registry_config(hub)) and "AKID" not in repr(registry_config(hub))
    assert cache_environment(hub) == {"PATH": os.environ["PATH"], "AWS_ACCESS_KEY_ID": "AKID",
                                      "AWS_SECRET_ACCESS_KEY": "SECRET", "AWS_SESSION_TOKEN": "TOKEN"}


def test_local_copies_are_on_by_default_and_zero_turns_them_off():
    assert parse(**S3).s3.copies_max_disk == 10 << 30
    assert parse(**S3, REGCACHE_S3_COPIES_MAX_DISK="512M").s3.copies_max_disk == 512 << 20
    assert parse(**S3, REGCACHE_S3_COPIES_MAX_DISK="0").s3.copies_max_disk == 0
