"""deploy/systemd/regcache.service: `systemd-analyze verify` (which needs no running systemd)
finds nothing wrong in it, it lets regcache write where its settings put its files, and its stop
timeout outlasts what `regcache up` may take to stop with the default settings. The verify, which
needs a mount namespace of its own (root), is in tests/e2e/test_systemd_unit.py."""

from __future__ import annotations

from pathlib import Path

from tests.support.parts import REPO
from regcache_core.config import DEFAULTS, load_config
from regcache_core.stack.caches import local_backends
from regcache_core.stack.launcher import STOP_TIMEOUT

UNIT = REPO / "deploy" / "systemd" / "regcache.service"


def settings(unit: Path) -> dict[str, list[str]]:
    """Each key's values, in order (a key may be given more than once)."""
    values: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_the_unit_lets_regcache_write_its_data_directory_and_mitmproxy_its_files():
    environment = dict(pair.split("=", 1) for line in settings(UNIT)["Environment"] for pair in line.split())
    [writable] = settings(UNIT)["ReadWritePaths"]
    assert Path(environment["REGCACHE_DATA_DIR"]).is_relative_to(writable)
    assert Path(environment["HOME"]).is_relative_to(writable)  # mitmproxy's $HOME/.mitmproxy


def test_the_stop_timeout_outlasts_the_grace_and_each_child_stopping(tmp_path):
    caches = local_backends(load_config(environ={}, env_file=tmp_path / "no.env"))
    children = 2 + len(caches)  # the proxy, the data plane, the caches
    [timeout] = settings(UNIT)["TimeoutStopSec"]
    assert float(timeout) > float(DEFAULTS["REGCACHE_STOP_GRACE"]) + STOP_TIMEOUT * children
