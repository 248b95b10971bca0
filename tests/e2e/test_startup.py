"""Start-up and shutdown of the real programs: bad settings, a missing registry program, signals,
and a cache that dies under `regcache up`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.parts import (
    PORT_BASES, PROXY_VARIABLES, REGCACHE, REGISTRY_PROGRAM, REPO, TEST_DOMAIN, accepts_connections, child_pids,
    command_line, docker_io_stack, pull,
)

MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
PORT = PORT_BASES["test_startup"]
CACHE_PORT = PORT + 1
DATAPLANE_PORT = PORT + 50


def run(command: list[str], workdir: Path, env_file_text: str, path: str | None = None, timeout: float = 60):
    """Run a command in `workdir` with `.env` there holding `env_file_text`, and no REGCACHE_* etc. from us."""
    (workdir / ".env").write_text(env_file_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGCACHE_", "REGISTRY_DOMAIN"))}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def test_regcache_up_with_a_bad_setting_says_which_in_one_line_and_starts_nothing(tmp_path):
    result = run([*REGCACHE, "up"], tmp_path, f"REGCACHE_PORT={PORT}\nDOCKERHUB_CACHE=http://127.0.0.1:70000\n")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "regcache: DOCKERHUB_CACHE: 'http://127.0.0.1:70000' is not a URL (Port out of range 0-65535)"
    ]
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()


def test_regcache_up_without_the_registry_program_says_how_to_install_it(tmp_path):
    """PATH holds nothing: python and mitmdump are found by absolute path, `registry` is not."""
    (tmp_path / "empty").mkdir()
    result = run([*REGCACHE, "up"], tmp_path, "", path=str(tmp_path / "empty"))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "registry program is not on PATH" in line and "apt-get install docker-registry" in line
    assert not (tmp_path / "data").exists()  # no cache config written, nothing started


def test_plain_mitmdump_with_a_bad_setting_exits_naming_it(tmp_path):
    result = run([MITMDUMP, "-s", str(REPO / "addons" / "regcache.py")], tmp_path, "REGCACHE_PULL_LOG_STDOUT=2\n")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "regcache: REGCACHE_PULL_LOG_STDOUT: '2' is not true or false" in output
    assert "Traceback" not in output


def test_sigterm_after_a_pull_stops_every_child_quietly_and_exits_0(tmp_path, upstream, images):
    """The pull leaves the cache's kept-alive connections to its egress listener open, which
    mitmproxy used to leave for asyncio.run to cancel (a CancelledError traceback each)."""
    stack = docker_io_stack(tmp_path, upstream, PORT).start()
    try:
        image = images["small"]
        assert pull(f"docker.io.{TEST_DOMAIN}:{PORT}", image.reference, tmp_path / "pulled") == image.manifest_digest
        started = child_pids(stack.process.pid)  # the proxy, the data plane's parent, the cache
        workers = child_pids(dataplane_parent(stack))
        ports = (PORT, DATAPLANE_PORT, CACHE_PORT)
        assert len(started) == 3 and len(workers) == os.cpu_count() and all(map(accepts_connections, ports))
    finally:
        status = stack.stop()
    assert status == 0
    assert not [line for line in stack.output if "Traceback" in line or "CancelledError" in line]
    assert not any(map(accepts_connections, ports))
    assert not any(Path(f"/proc/{pid}").exists() for pid in started + workers)


def dataplane_parent(stack) -> int:
    return next(pid for pid in child_pids(stack.process.pid) if "regcache_core.dataplane" in command_line(pid))


def test_a_data_plane_worker_that_dies_stops_the_rest_and_exits_1(tmp_path, upstream):
    stack = docker_io_stack(tmp_path, upstream, PORT).start()
    try:
        os.kill(child_pids(dataplane_parent(stack))[0], signal.SIGKILL)
        assert stack.process.wait(30) == 1
        assert not accepts_connections(PORT) and not accepts_connections(DATAPLANE_PORT)
        assert any("data plane exited with status 1; stopping" in line for line in stack.output)
    finally:
        stack.stop()


def test_the_proxy_dying_stops_the_rest_and_exits_1(tmp_path, upstream):
    """A cache that dies is started again (test_supervision.py); without the proxy nothing is served."""
    stack = docker_io_stack(tmp_path, upstream, PORT).start()
    try:
        os.kill(stack.child("mitmdump"), signal.SIGKILL)
        assert stack.process.wait(30) == 1
        assert not accepts_connections(PORT + 1), "the cache is stopped too"
        assert any("exited with status" in line and "stopping" in line for line in stack.output)
    finally:
        stack.stop()


def test_regcache_up_gets_ready_with_a_proxy_variable_set_and_logs_no_probe(tmp_path, upstream):
    """Readiness probes never go through a proxy, and never to the client port (the pull log's)."""
    nowhere = {variable: "http://127.0.0.1:9" for variable in PROXY_VARIABLES}
    stack = docker_io_stack(tmp_path, upstream, PORT, nowhere).start(timeout=20)
    try:
        assert stack.pull_records() == []
    finally:
        stack.stop()


def test_a_cache_on_ipv6_loopback_runs_and_serves(tmp_path, upstream, images):
    image = images["small"]
    stack = docker_io_stack(tmp_path, upstream, PORT, {"DOCKERHUB_CACHE": f"http://[::1]:{CACHE_PORT}"}).start(timeout=30)
    try:
        assert pull(f"docker.io.{TEST_DOMAIN}:{PORT}", image.reference, tmp_path / "pulled") == image.manifest_digest
        assert accepts_connections(CACHE_PORT, "::1")
    finally:
        stack.stop()


def test_a_taken_data_plane_port_stops_start_up_with_one_line_saying_so(tmp_path, upstream):
    with squat("127.0.0.1", DATAPLANE_PORT):
        stack = docker_io_stack(tmp_path, upstream, PORT)
        try:
            with pytest.raises(RuntimeError) as failed:
                stack.start(timeout=30)
        finally:
            stack.stop()  # nothing left running if it did start
    output = str(failed.value)
    assert "regcache: data plane exited with status 1 while starting" in output
    assert f"regcache data plane: [Errno 98] error while attempting to bind on address ('::', {DATAPLANE_PORT}" in output \
        or "address already in use" in output
    assert "Traceback" not in output
    assert stack.process.returncode == 1


def stack_settings(**settings: str) -> str:
    """A .env for one cached registry on this module's ports, its upstream nowhere: what the
    start-up errors below need, nothing more."""
    return "".join(f"{name}={value}\n" for name, value in {
        "REGCACHE_PORT": PORT, "REGCACHE_EGRESS_PORT": PORT + 80, "REGCACHE_ADMIN_PORT": PORT + 70,
        "REGCACHE_DATAPLANE_PORT": DATAPLANE_PORT, "REGCACHE_REGISTRIES": "DOCKERHUB",
        "DOCKERHUB_UPSTREAM": f"http://127.0.0.1:{PORT + 1009}", "DOCKERHUB_CACHE": f"http://127.0.0.1:{CACHE_PORT}",
        **settings,
    }.items())


def squat(host: str, port: int) -> socket.socket:
    squatter = socket.socket()
    # An earlier test's connections to this port may linger in TIME_WAIT: without SO_REUSEADDR
    # they would keep the squatter from binding.
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind((host, port))
    squatter.listen()
    return squatter


TAKEN_PORTS = {
    "client": ("0.0.0.0", PORT, f"port {PORT} (the client port) is in use by another program: "
               "stop that, or set REGCACHE_PORT to a free port"),
    "egress": ("127.0.0.1", PORT + 80, f"port {PORT + 80} (DOCKERHUB's egress listener, its cache's upstream) is in use "
               "by another program: stop that, or set DOCKERHUB_EGRESS_PORT (or REGCACHE_EGRESS_PORT, the first "
               "egress port) to a free port"),
}


@pytest.mark.parametrize("taken", TAKEN_PORTS)
def test_regcache_up_with_a_taken_port_says_which_setting_moves_it_in_one_line(tmp_path, taken):
    host, port, message = TAKEN_PORTS[taken]
    with squat(host, port):
        result = run([*REGCACHE, "up"], tmp_path, stack_settings(REGCACHE_DATA_DIR=tmp_path / "data"))
    assert (result.returncode, result.stderr.splitlines(), result.stdout) == (1, [f"regcache: {message}"], "")


@pytest.mark.parametrize("taken", TAKEN_PORTS)
def test_plain_mitmdump_with_a_taken_port_says_which_setting_moves_it(tmp_path, taken):
    host, port, message = TAKEN_PORTS[taken]
    with squat(host, port):
        result = run([MITMDUMP, "-s", str(REPO / "addons" / "regcache.py")], tmp_path,
                     stack_settings(REGCACHE_DATA_DIR=tmp_path / "data"), timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"regcache: {message}" in output
    assert "127.0.0.1:1" not in output and "Traceback" not in output


def unusable_data_dirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Data directories regcache cannot use (we are root: only a read-only mount stops a write)."""
    (tmp_path / "a-file").write_text("")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(read_only), str(read_only)], check=True)
    return {
        "a file": (tmp_path / "a-file", f"'{tmp_path / 'a-file'}' is a file, not a directory"),
        "under a file": (tmp_path / "a-file" / "data", f"cannot create '{tmp_path / 'a-file' / 'data'}': Not a directory"),
        "read-only": (read_only, f"cannot write in '{read_only}': Read-only file system"),
    }


@pytest.mark.parametrize("program", ["regcache up", "mitmdump"])
def test_an_unusable_data_dir_is_one_line_naming_it(tmp_path, program):
    cases = unusable_data_dirs(tmp_path)
    try:
        for data_dir, reason in cases.values():
            command = [*REGCACHE, "up"] if program == "regcache up" else [MITMDUMP, "-s", str(REPO / "addons" / "regcache.py")]
            result = run(command, tmp_path, stack_settings(REGCACHE_DATA_DIR=data_dir), timeout=30)
            line = f"regcache: REGCACHE_DATA_DIR: {reason}"
            if program == "regcache up":
                assert (result.returncode, result.stderr.splitlines(), result.stdout) == (2, [line], "")
            else:
                output = result.stdout + result.stderr
                assert result.returncode == 1 and line in output and "Traceback" not in output
    finally:
        subprocess.run(["umount", str(tmp_path / "read-only")], check=True)


def test_a_cache_that_exits_while_starting_is_one_line_with_the_reason_from_its_log(tmp_path):
    """registry:2 says why in its log (a fatal line, or a Go panic); `regcache up` repeats it."""
    storage = tmp_path / "storage"
    (storage / "scheduler-state.json").mkdir(parents=True)  # a storage root not made by registry:2
    (tmp_path / "a-file").write_text("")
    log = tmp_path / "data" / "dockerhub" / "registry.log"
    cases = [
        ({}, f"status 1 while starting: listen tcp 127.0.0.1:{CACHE_PORT}: bind: address already in use"),
        ({"DOCKERHUB_STORAGE": storage},
         f"status 2 while starting: filesystem: read {storage}/scheduler-state.json: is a directory"),
    ]
    with squat("127.0.0.1", CACHE_PORT) as squatter:
        for settings, reason in cases:
            if settings:
                squatter.close()
            result = run([*REGCACHE, "up"], tmp_path, stack_settings(REGCACHE_DATA_DIR=tmp_path / "data", **settings))
            assert result.stderr.splitlines() == [f"regcache: cache for docker.io (log: {log}) exited with {reason}"]
            assert result.returncode == 1
    result = run([*REGCACHE, "up"], tmp_path, stack_settings(REGCACHE_DATA_DIR=tmp_path / "data",
                                                             DOCKERHUB_STORAGE=tmp_path / "a-file"))
    assert result.stderr.splitlines() == [f"regcache: DOCKERHUB_STORAGE: '{tmp_path / 'a-file'}' is a file, not a directory"]
    assert result.returncode == 2
