"""A real Redis (Debian's redis-server) for tests: started on a loopback port, stopped, killed,
paused (SIGSTOP: a Redis that accepts connections and answers nothing) and started again on
the same port. Plain class, no pytest: the unit lane runs it without root, the e2e lane inside
its namespaces."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """`password`: clients must AUTH with it (`url` holds it), as production Redis wants."""

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1", password: str | None = None) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{f':{self.password}@' if self.password else ''}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        program = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [program, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
             "--maxmemory-policy", "noeviction", "--dir", str(self.workdir),
             *(["--requirepass", self.password] if self.password else [])],
            stdout=(self.workdir / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {(self.workdir / 'redis.log').read_text()[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
                    s.sendall(auth + b"PING\r\n")
                    if s.recv(32).endswith(b"+PONG\r\n"):  # after AUTH's +OK (one read short of it: try again)
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.host}:{self.port} within {timeout} s")

    def pause(self) -> None:
        """It keeps its port and answers nothing, as a Redis stuck or far away."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(sig)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
