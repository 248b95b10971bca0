"""docker-compose.yml's proxy healthcheck run for real against `regcache up`, on regcache's default
ports. The file's other checks, without an engine, are in tests/unit/test_compose.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from regcache_core.config import DEFAULTS
from tests.support.parts import PORT_BASES, REGISTRY_PROGRAM, docker_io_stack
from tests.unit.test_compose import PROXY, project_dir, resolved  # noqa: F401 (fixtures)


def test_proxy_healthcheck_is_readiness_and_passes_only_when_the_docker_io_cache_answers(resolved, upstream, tmp_path):
    check = resolved["services"][PROXY]["healthcheck"]["test"][1:]
    run_check = lambda: subprocess.run([sys.executable, *check[1:]], capture_output=True, timeout=30)  # noqa: E731
    assert check[0] == "python"
    assert run_check().returncode != 0, "healthy with nothing listening"
    # On regcache's default ports, which the check asks; the suite keeps them free for this.
    stack = docker_io_stack(tmp_path, upstream, PORT_BASES["test_compose"]).start()
    try:
        assert stack.admin_port == int(DEFAULTS["REGCACHE_ADMIN_PORT"])
        result = run_check()
        assert result.returncode == 0, result.stderr
        cache = stack.child(REGISTRY_PROGRAM)
        os.kill(cache, signal.SIGSTOP)  # the cache stops answering
        try:
            assert run_check().returncode != 0, "healthy while the cache does not answer"
        finally:
            os.kill(cache, signal.SIGCONT)
    finally:
        stack.stop()
