"""What `regcache up` ends its stack with, without a stack: the pid file naming only processes
that still run as recorded, and children that die with their parent. The stack's own ends are
in tests/e2e/test_stack_lifetime.py."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading

import pytest

from regcache_core.stack.parent_death import die_with_parent, dies_with_this_process
from regcache_core.stack.pid_file import FILE_NAME, PidFile, StackProcess, still_running
from tests.support.parts import has_exited, poll


def test_a_pid_file_names_only_processes_that_still_run_as_recorded(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        PidFile(tmp_path).record([StackProcess(sleeper.pid, "regcache up")])
        assert still_running(tmp_path) == [StackProcess(sleeper.pid, "regcache up")]
        # The same pid with another start time (the kernel gave a dead stack's pid to another
        # process), and a line that is no record.
        pid, started, _ = (tmp_path / FILE_NAME).read_text().split(" ", 2)
        (tmp_path / FILE_NAME).write_text(f"{pid} {int(started) + 1} regcache up\nnot a record\n")
        assert still_running(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    PidFile(tmp_path).record([StackProcess(sleeper.pid, "regcache up")])  # gone by now
    assert still_running(tmp_path) == []
    PidFile(tmp_path).remove()
    assert still_running(tmp_path) == [] and not (tmp_path / FILE_NAME).exists()


GRANDPARENT = """
import subprocess, sys, time
from regcache_core.stack.parent_death import dies_with_this_process
child = subprocess.Popen(["sleep", "60"], preexec_fn=dies_with_this_process())
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_dies_with_its_parent_killed_by_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", GRANDPARENT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not has_exited(child)
        parent.kill()
        assert poll(lambda: has_exited(child), bool, timeout=2)
    finally:
        parent.kill()
        parent.wait()


def test_a_child_whose_parent_ended_before_it_asked_for_the_signal_ends_itself():
    """The race: the parent died between fork and prctl, so the child now has another parent."""
    not_the_parent = os.getppid()
    child = subprocess.Popen(["sleep", "60"], preexec_fn=functools.partial(die_with_parent, not_the_parent))
    assert child.wait(10) == -signal.SIGKILL


def test_children_are_forked_only_from_the_main_thread():
    """The signal comes when the forking thread ends, which for any thread but the main one is
    before the process ends."""
    raised = []
    thread = threading.Thread(target=lambda: raised.append(pytest.raises(RuntimeError, dies_with_this_process)))
    thread.start()
    thread.join()
    assert "main thread" in str(raised[0].value)
