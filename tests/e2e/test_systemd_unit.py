"""deploy/systemd/regcache.service through `systemd-analyze verify`, in a mount namespace of its
own (so as root). What the unit file says is checked in tests/unit/test_systemd_unit.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.unit.test_systemd_unit import UNIT, settings


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
