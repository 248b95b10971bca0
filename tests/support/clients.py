"""Real registry clients as daemons of their own: containerd (what k3s/k3d nodes pull with) and
Docker Engine. Each keeps all its state, sockets and logs under one directory, so it touches
nothing of the machine's; run them inside the private namespaces (see parts.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from .parts import stop_process


class Daemon:
    """A daemon started with a log file, ready once `ready()` says so."""

    def __init__(self, root: Path, network_namespace: str | None = None) -> None:
        self.root = root
        self.network_namespace = network_namespace  # a path for `nsenter --net=`; None: this process's
        self.process: subprocess.Popen | None = None

    @property
    def log_file(self) -> Path:
        return self.root / "daemon.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            enter = ["nsenter", f"--net={self.network_namespace}"] if self.network_namespace else []
            self.process = subprocess.Popen([*enter, *self.command()], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{type(self).__name__} did not start:\n{self.log_file.read_text()[-3000:]}")
            time.sleep(0.2)
        return self

    def _answers(self) -> bool:
        try:
            return self.ready()
        except subprocess.TimeoutExpired:  # its socket is there, its API not yet
            return False

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, timeout=20)
            self.process = None


class Containerd(Daemon):
    """containerd 1.6 with its own root, state and socket, and no CRI (nothing Kubernetes here)."""

    @property
    def socket(self) -> Path:
        return self.root / "containerd.sock"

    def command(self) -> list[str]:
        config = self.root / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.root / "root"}"\n'
            f'state = "{self.root / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            # Its default is /opt/containerd, on the machine.
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.root / "opt"}"\n'
        )
        return ["containerd", "--config", str(config)]

    def ready(self) -> bool:
        return self.socket.exists() and self.ctr("version", timeout=10).returncode == 0

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.socket), *args], capture_output=True, text=True, timeout=timeout)

    def pull(self, reference: str, hosts_dir: Path) -> subprocess.CompletedProcess:
        """`ctr images pull` with a certs.d directory, unpacking into the native snapshotter."""
        return self.ctr("images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native", reference)

    def image_digest(self, reference: str) -> str:
        """The manifest (or index) digest containerd stored for an image."""
        return self._row(reference, "images", "ls")[2]

    def unpacked(self, reference: str) -> bool:
        """True when all the image's content is there and unpacked into native snapshots."""
        row = self._row(reference, "images", "check", "--snapshotter", "native")
        return row[3] == "complete" and row[-1] == "true"  # STATUS "complete (n/n)", UNPACKED last

    def _row(self, reference: str, *command: str) -> list[str]:
        """The columns of a ctr listing's row for `reference`."""
        lines = self.ctr(*command).stdout.splitlines()
        return next(line.split() for line in lines[1:] if line.split()[0] == reference)


class Dockerd(Daemon):
    """Docker Engine without networking of its own (no bridge, no iptables), by default on the
    vfs driver (overlay2 is much faster to build on, where the kernel and the file system have it).

    It runs in a mount namespace of its own with an empty /run and /etc/docker (it always writes
    /run/docker/plugins and /etc/docker/key.json), on a Containerd of ours or, with none given,
    on the one it starts itself, with an empty /opt too (that one writes /opt/containerd). Its
    mounts, the nsfs one in its exec root too, go away with it. Containers with `--network host`
    run only on its own containerd: on ours runc fails ("can't get final child's PID").
    """

    def __init__(self, root: Path, daemon_json: Path, containerd: Containerd | None = None,
                 network_namespace: str | None = None, storage_driver: str = "vfs") -> None:
        super().__init__(root, network_namespace)
        self.daemon_json = daemon_json
        self.containerd = containerd
        self.storage_driver = storage_driver

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    def command(self) -> list[str]:
        empty = "/run /etc/docker" if self.containerd else "/run /etc/docker /opt"
        containerd = ["--containerd", str(self.containerd.socket)] if self.containerd else []
        return [
            "unshare", "--mount", "sh", "-c", f'for d in {empty}; do mount -t tmpfs tmpfs $d; done && exec "$@"', "-",
            "dockerd", "-H", f"unix://{self.socket}", "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid"),
            "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
            "--storage-driver", self.storage_driver, *containerd, "--config-file", str(self.daemon_json),
        ]

    def ready(self) -> bool:
        return self.socket.exists() and self.docker("version", timeout=10).returncode == 0

    def docker(self, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "-H", f"unix://{self.socket}", *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env} if env else None)

    def inspect(self, reference: str) -> dict:
        return json.loads(self.docker("image", "inspect", reference).stdout)[0]
