"""`regcache client-config` into a directory it cannot write: a read-only bind mount, so root in
the e2e lane's mount namespace. The client files themselves are in
tests/unit/test_client_config.py."""

from __future__ import annotations

import os
import subprocess

from tests.support.parts import REGCACHE


def test_client_config_into_a_directory_it_cannot_write_says_so_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(read_only), str(read_only)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGCACHE_", "REGISTRY_DOMAIN"))}
    try:
        for out, failed, reason in [
            (tmp_path / "a-file" / "out", tmp_path / "a-file" / "out", "Not a directory"),
            (read_only, read_only / "registries.yaml", "Read-only file system"),
        ]:
            result = subprocess.run([*REGCACHE, "client-config", "--out", str(out)], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=30)
            assert (result.returncode, result.stderr.splitlines(), result.stdout) == (
                2, [f"regcache client-config: --out {out}: cannot write {failed}: {reason}"], "")
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
