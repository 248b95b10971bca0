"""deploy/systemd/regcache.service: `systemd-analyze verify` (which needs no running systemd)
finds nothing wrong in it, it lets regcache write where its settings put its files, and its stop
timeout outlasts what `regcache up` may take to stop with the default settings."""

from __future__ import annotations

import subprocess
from pathlib import Path

from parts import REPO
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


def verify(unit: Path) -> str:
    """What `systemd-analyze verify` says of a unit file, which it requires to be all right.
    It checks that ExecStart's program exists: in a mount namespace of its own, an empty
    script stands in for the installed `regcache`."""
    program = Path(settings(UNIT)["ExecStart"][0].split()[0])
    script = (f"mount -t tmpfs tmpfs {program.parents[-2]} && mkdir -p {program.parent} && "
              f"printf '#!/bin/sh\\n' > {program} && chmod +x {program} && exec systemd-analyze verify {unit}")
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    return f"exit {result.returncode}: {result.stdout}{result.stderr}"


def test_systemd_analyze_verify_finds_nothing_wrong_in_the_unit(tmp_path):
    assert verify(UNIT) == "exit 0: "
    broken = tmp_path / "regcache.service"
    broken.write_text(UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    assert "Failed to parse kill mode" in verify(broken), "the check sees a mistake"


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
