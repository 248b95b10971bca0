"""`<data dir>/regcache-up.pids`: the processes of the `regcache up` that runs on a data
directory, so that another one started on it names them in one line instead of failing on the
first port they hold. A line per process: its pid, its start time (a pid the kernel has given
to another process since is not taken for it) and what it is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "regcache-up.pids"


@dataclass(frozen=True)
class StackProcess:
    pid: int
    what: str  # "regcache up", "proxy (mitmdump)", ...


def still_running(data_dir: Path) -> list[StackProcess]:
    """The processes the data directory's pid file names that still run (none without a file)."""
    try:
        lines = (Path(data_dir) / FILE_NAME).read_text().splitlines()
    except FileNotFoundError:
        return []
    running = []
    for line in lines:
        pid, started, what = (line.split(" ", 2) + ["", ""])[:3]
        if pid.isdigit() and int(pid) != os.getpid() and _start_time(int(pid)) == started:
            running.append(StackProcess(int(pid), what))
    return running


def describe(processes: list[StackProcess]) -> str:
    """"pids 12 (regcache up), 15 (proxy (mitmdump))": for a line to the operator."""
    return "pids " + ", ".join(f"{p.pid} ({p.what})" for p in processes)


class PidFile:
    """This run's pid file: rewritten whenever its processes change, removed once they stopped."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self.written: list[StackProcess] | None = None

    def record(self, processes: list[StackProcess]) -> None:
        if processes == self.written:
            return
        lines = [f"{p.pid} {_start_time(p.pid) or 0} {p.what}\n" for p in processes]
        # Whole or not at all: another `regcache up` may read it at any moment.
        partial = self.path.with_name(f".{FILE_NAME}.{os.getpid()}")
        partial.write_text("".join(lines))
        partial.replace(self.path)
        self.written = processes

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _start_time(pid: int) -> str | None:
    """When a live process started (clock ticks since boot, the 22nd field of /proc/PID/stat);
    None for no such process, or one that has exited and waits to be reaped (a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    state, started = fields[0], fields[19]
    return None if state in ("Z", "X") else started
