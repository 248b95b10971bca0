"""The registry:2 caches `regcache up` runs: the configuration written for each (stack/caches.py)."""

from __future__ import annotations

import json

from regcache_core.config import DEFAULTS, parse_config
from regcache_core.stack.caches import local_backends, write_registry_config


def backend(tmp_path, **settings: str):
    config = parse_config({**DEFAULTS, "REGCACHE_DATA_DIR": str(tmp_path / "data"), "REGCACHE_REGISTRIES": "DOCKERHUB",
                           **settings})
    [dockerhub] = local_backends(config)
    return dockerhub


def test_a_cache_on_storage_of_its_own_keeps_its_config_and_log_in_the_data_dir(tmp_path):
    shared = tmp_path / "shared" / "dockerhub"
    dockerhub = backend(tmp_path, DOCKERHUB_STORAGE=str(shared))
    written = json.loads(write_registry_config(dockerhub).read_text())
    assert dockerhub.config_file == tmp_path / "data" / "dockerhub" / "config.yml"
    assert written["storage"]["filesystem"]["rootdirectory"] == str(shared) and shared.is_dir()
