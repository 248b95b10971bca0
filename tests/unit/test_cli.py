"""The `regcache` command as a newcomer uses it: --env-file on either side of the command, a
reader that stops early, Ctrl-C, a misspelt variable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.parts import REGCACHE, poll
from regcache_core.cli import main
from regcache_core.config import DEFAULTS

LOG = Path(__file__).parent / "data" / "pull-with-broken-lines.log"


@pytest.fixture
def env_file(tmp_path, monkeypatch) -> Path:
    """A settings file naming the recorded pull log; no settings of ours in the environment."""
    for name in DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    path = tmp_path / "other.env"
    path.write_text(f"REGCACHE_PULL_LOG={LOG}\n")
    return path


@pytest.mark.parametrize("before_the_command", [True, False])
def test_env_file_is_read_before_or_after_the_command(env_file, capsys, before_the_command):
    argv = ["--env-file", str(env_file), "stats", "--json"] if before_the_command else ["stats", "--env-file", str(env_file), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 14


def test_a_misspelt_variable_gets_one_warning_line_naming_the_setting(env_file, capsys):
    env_file.write_text(env_file.read_text() + "DOCKERHUB_UPSTRAEM=https://mirror.example\nCOMPOSE_PROJECT_NAME=x\n")
    assert main(["stats", "--env-file", str(env_file)]) == 0
    assert capsys.readouterr().err == (
        "regcache: DOCKERHUB_UPSTRAEM is not a regcache setting; did you mean DOCKERHUB_UPSTREAM?\n"
    )


def test_a_reader_that_stops_early_gets_no_traceback():
    """`regcache stats --json | head -1`: the pipe is closed before the command writes."""
    command = subprocess.Popen([*REGCACHE, "stats", "--json", str(LOG)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()
    stderr = command.stderr.read().decode()
    assert command.wait(30) == 141 and stderr == ""


def test_ctrl_c_ends_a_command_without_a_traceback(tmp_path):
    fifo = tmp_path / "pull.log"
    os.mkfifo(fifo)
    # Ctrl-C as in a terminal: a test run started in the background by a shell without job
    # control (`scripts/test unit &`) ignores SIGINT, and its children would inherit that.
    command = subprocess.Popen([*REGCACHE, "stats", str(fifo)], stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Opening the writing end succeeds once the command holds the reading end; it then waits
    # for lines that never come.
    writer = poll(lambda: _open_writer(fifo), lambda fd: fd is not None, timeout=30)
    try:
        assert writer is not None
        command.send_signal(signal.SIGINT)
        assert command.wait(30) == 130
        assert command.stderr.read().decode() == ""
    finally:
        command.kill()
        command.wait()
        if writer is not None:
            os.close(writer)


def _open_writer(fifo: Path) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None  # no reader yet
