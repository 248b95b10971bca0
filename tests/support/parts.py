"""Real parts for end-to-end tests and benchmarks: registry, skopeo, umoci and `regcache up`.

Plain functions and small classes, no pytest: scripts/ uses them too. Everything listens on
loopback inside the private network namespace that `enter_private_namespaces` makes (tests/e2e's
conftest.py and the benchmarks call it first).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from regcache_core.stack.caches import find_registry_program

REPO = Path(__file__).resolve().parents[2]  # the checkout: this file is tests/support/parts.py
TEST_DOMAIN = "regcache.test"
# A cache on another host, as compose runs them: `regcache up` leaves it alone, and in tests
# nothing listens there, which is what a stopped cache looks like to the proxy.
REMOTE_CACHE_HOST = f"cache.{TEST_DOMAIN}"
REGCACHE = [sys.executable, "-m", "regcache_core.cli"]  # the `regcache` command of this checkout
REGISTRY_PROGRAM = find_registry_program() or "docker-registry"  # what `regcache up` runs its caches with
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = f"{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"

# Where each test module's servers listen: no two that can be alive at the same time share a
# port. A stack on base B serves on B, runs its caches on B+1.., its admin endpoint on B+70 and
# its egress listeners on B+80..; the module's own upstreams and fake servers use B+1000..
PORT_BASES = {
    "test_compose": 5000,  # regcache's defaults: the compose file's healthcheck asks 127.0.0.1:5070
    "test_egress[anonymous]": 5100,
    "test_egress[basic]": 5200,
    "test_egress[token]": 5300,
    "test_clients": 5400,
    "session": 5500,  # conftest's `upstream` and `stack`, alive the whole session
    "test_observability": 5600,
    "test_startup": 5700,
    "test_web": 5800,  # quay.io cache on 5802, upstreams 6800-6801; and mitmweb's UI on its fixed 8081: the only `regcache up --web` of the suite
    "test_client_access": 7400,
    "test_faults": 6900,
    "test_referrers": 7000,
    "test_budget": 7100,
    "test_supervision": 7200,
    "test_disk_full": 7300,
    # Not 6500: that is the session upstream's (5500 + UPSTREAM_OFFSET).
    "test_tag_cache": 6700,
    "test_outages": 6600,
    "test_dataplane": 6100,
    "test_dataplane[off]": 6200,  # REGCACHE_DATAPLANE=false
    "test_single_flight": 6300,
    "test_single_flight[own upstream]": 6400,  # an upstream killed, one behind a CDN
    "test_upstream_auth": 7500,  # its loopback token servers; no stack
    "test_slow_clients": 7800,  # not 7600: test_outages' upstream (6600 + UPSTREAM_OFFSET)
    "test_spool_download": 8100,  # its upstream and CDN only; no stack
    "test_stack_lifetime": 8500,
    "test_cold": 8200,  # a token upstream on 9200, its token server 9201 and CDN 9202
    "test_cluster": 8600,  # gateway: HAProxy 8600, Redis 8660, regional stacks 8700 and 8705; replicas: 8600.. in their namespaces
    "test_big_heads": 8800,
    "test_dashboard": 8900,
    "test_cluster_state": 9000,  # HAProxy on 9000 and Redis on 9060 in the gateway, the upstream on 10000
    "test_cluster_blobs": 9300,  # the cluster bed (tests/support/cluster.py); its slow link to the upstream on 10301
    "test_s3_storage": 9400,  # stacks on 9400, 9403 (presigned) and 9405 (budget), each at +0, +1, +50, +70, +80; S3 on free ports
    "test_s3_storage[replicas]": 9700,  # a cluster (tests/support/cluster.py): HAProxy 9700, Redis 9760, upstream 10700
}
UPSTREAM_OFFSET = 1000

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def enter_private_namespaces(hostnames: list[str]) -> None:
    """Move this process into new network and mount namespaces, with `hostnames` on loopback.

    Every server started afterwards listens on a loopback of its own (no port can collide with
    anything on the machine), and a private /etc/hosts points the names at 127.0.0.1. Children
    inherit both. Needs root; raises OSError saying what failed.
    """
    if os.geteuid() != 0:
        raise PermissionError("needs root, to unshare network and mount namespaces")
    global _host_network
    _host_network = os.open("/proc/self/ns/net", os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS | CLONE_NEWNET) != 0:
        raise OSError(f"unshare failed: {os.strerror(ctypes.get_errno())}")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory(prefix="regcache-hosts-") as directory:
        hosts = Path(directory) / "hosts"
        hosts.write_text(f"127.0.0.1 localhost {' '.join(hostnames)}\n::1 localhost\n")
        # The bind mount holds the file itself, so the temporary copy can go right away.
        subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    for variable in PROXY_VARIABLES:  # nothing here may go through a proxy of the machine's
        os.environ.pop(variable, None)
    # The product flushes its own log lines; a machine's PYTHONUNBUFFERED=1 must not hide it when not.
    os.environ.pop("PYTHONUNBUFFERED", None)


_host_network: int | None = None  # an open handle on the network namespace the process started in


def host_network_namespace() -> str:
    """A path to the machine's network namespace, for `nsenter --net=`: only what must reach the
    package registries (the compose test's image builds) goes there."""
    return f"/proc/{os.getpid()}/fd/{_host_network}"


def accepts_connections(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def poll(read, done, timeout: float = 10.0, every: float = 0.05):
    """read() until done(value) holds or `timeout` passes; returns the last value, for the
    caller's assertions to show what was there when waiting ended."""
    deadline = time.monotonic() + timeout
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


def pause(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP `pid` and return once every thread of it is stopped: the signal takes effect as
    each thread is next scheduled, and a thread running meanwhile may still answer a request."""
    os.kill(pid, signal.SIGSTOP)

    def states() -> set[str]:
        found = set()
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            with contextlib.suppress(OSError):
                found.add(stat.read_text().rsplit(")", 1)[1].split()[0])
        return found

    assert poll(states, lambda found: found and found <= {"T", "t"}, timeout), f"{pid} did not stop"


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if accepts_connections(port, host):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def stop_process(process: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class AccessLine:
    method: str
    path: str  # with its query
    status: int


# Any method token: a backend must never see one that is not GET or HEAD, "get" included.
_ACCESS_LINE = re.compile(r'\] "(?P<method>[^ "]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>[0-9]{3}) ')


def read_access_log(log_file: Path) -> list[AccessLine]:
    """Every request a registry answered, in order, from its log (registry:2 writes one
    combined-log-format line per request whatever its log level)."""
    lines = log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
    return [AccessLine(m["method"], m["path"], int(m["status"])) for m in map(_ACCESS_LINE.search, lines) if m]


class Upstream:
    """A plain `registry` (registry:2's program) on loopback: what Docker Hub is to a user.

    `extra` adds configuration sections, e.g. `auth` (see htpasswd_auth, fakes.TokenServer)
    or `middleware` (fakes.Cdn); `creds` ("user:password") is what pushes to it use; `host` is the
    address it listens on (a cluster's bridge address, see cluster.py).
    """

    def __init__(self, root: Path, port: int, extra: dict | None = None, creds: str | None = None,
                 host: str = "127.0.0.1") -> None:
        self.root, self.port, self.host = root, port, host
        self.url = f"http://{host}:{port}"
        self.extra, self.creds = extra or {}, creds
        self.process: subprocess.Popen | None = None

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def start(self) -> "Upstream":
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(json.dumps({
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}},
            "http": {"addr": f"{self.host}:{self.port}"},
            **self.extra,
        }))
        with open(self.root / "registry.log", "ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen([REGISTRY_PROGRAM, "serve", str(config)], stdout=log, stderr=log)
        wait_for_port(self.port, self.host)
        return self

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)
            self.process = None

    def push(self, image: "TestImage") -> None:
        push_image(image, f"{self.host}:{self.port}", self.creds)

    def access_log(self) -> list[AccessLine]:
        return read_access_log(self.root / "registry.log")

    def requests_for(self, path_part: str, method: str | None = None) -> list[AccessLine]:
        """The access log's requests whose path contains `path_part` (and of `method`, if given)."""
        return [line for line in self.access_log() if path_part in line.path and method in (None, line.method)]

    def push_multiarch(self, image: "MultiArchImage") -> None:
        for platform in image.platforms.values():
            self.push(platform)
        push_index(image, self.url, self.creds)


def htpasswd_auth(root: Path, user: str, password: str) -> dict:
    """The `auth` section of a registry configuration asking for Basic credentials (bcrypt htpasswd)."""
    line = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True).stdout
    path = root / "htpasswd"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(line.strip() + "\n")
    return {"htpasswd": {"realm": "regcache-test", "path": str(path)}}


@dataclass
class TestImage:
    name: str  # repository, e.g. library/small
    tag: str
    layout: Path  # OCI layout holding it
    manifest_digest: str = ""
    manifest_size: int = 0
    manifest_type: str = ""  # the manifest's media type, as the registry stored it
    blob_digests: list[str] = field(default_factory=list)  # config and layers

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass
class MultiArchImage:
    """An OCI image index with one image per architecture, as almost every docker.io image is.

    Each platform's image is pushed under a tag of its own (`<tag>-<architecture>`), the index
    under `tag`.
    """

    name: str
    tag: str
    platforms: dict[str, TestImage]  # architecture -> its image
    index_digest: str = ""

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def blob_digests(self) -> list[str]:
        return [digest for image in self.platforms.values() for digest in image.blob_digests]


def build_multiarch_image(workdir: Path, name: str, tag: str, architectures: list[str]) -> MultiArchImage:
    """One small image per architecture, each with content of its own (no blob is shared)."""
    return MultiArchImage(name, tag, {
        architecture: build_image(workdir, name, [(f"etc/{architecture}", os.urandom(1000))],
                                  tag=f"{tag}-{architecture}", architecture=architecture)
        for architecture in architectures
    })


def build_image(workdir: Path, name: str, layer_files: list[tuple[str, bytes | int]], tag: str = "1.0",
                architecture: str = "amd64") -> TestImage:
    """Build an OCI image offline with umoci: one layer per (path, content or random size)."""
    layout = workdir / f"{name.replace('/', '_')}-{tag}"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:{tag}"], check=True)
    for index, (path, content) in enumerate(layer_files):
        source = workdir / f"{layout.name}-layer{index}"
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            with open(source / path, "wb") as f:
                for _ in range(content // (1 << 20)):
                    f.write(os.urandom(1 << 20))
        else:
            (source / path).write_bytes(content)
        subprocess.run(["umoci", "insert", "--image", f"{layout}:{tag}", str(source / path), f"/{path}"], check=True)
    subprocess.run(
        ["umoci", "config", "--image", f"{layout}:{tag}", "--architecture", architecture, "--os", "linux",
         "--config.cmd", "/bin/true"],
        check=True,
    )
    return TestImage(name, tag, layout)


def skopeo(*args: str, hosts_env: dict | None = None, timeout: float = 300,
           enter: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`enter`: a command skopeo runs under, e.g. cluster.Replica.pinned."""
    return subprocess.run(
        [*enter, "skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=timeout, env=hosts_env
    )


def push_image(image: TestImage, registry: str, creds: str | None = None) -> None:
    """Copy an OCI layout into a registry, keeping digests, and record them on the image."""
    result = skopeo("copy", "--dest-tls-verify=false", *(["--dest-creds", creds] if creds else []),
                    f"oci:{image.layout}:{image.tag}", f"docker://{registry}/{image.reference}")
    assert result.returncode == 0, result.stderr
    raw = skopeo("inspect", "--tls-verify=false", *(["--creds", creds] if creds else []), "--raw",
                 f"docker://{registry}/{image.reference}").stdout
    image.manifest_digest = "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
    image.manifest_size = len(raw.encode())
    manifest = json.loads(raw)
    image.manifest_type = manifest.get("mediaType", OCI_MANIFEST)  # optional in OCI manifests
    image.blob_digests = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def push_index(image: MultiArchImage, registry_url: str, creds: str | None = None,
               authorization: str | None = None) -> None:
    """PUT an OCI image index of `image`'s pushed platform images under its tag, as
    `docker buildx` does; records its digest on the image. `creds` go as Basic; a token
    upstream wants an `authorization` of its own (a Bearer token)."""
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": platform.manifest_type, "digest": platform.manifest_digest, "size": platform.manifest_size,
             "platform": {"architecture": architecture, "os": "linux"}}
            for architecture, platform in image.platforms.items()
        ],
    }).encode()
    if creds:
        authorization = "Basic " + base64.b64encode(creds.encode()).decode()
    auth = {"Authorization": authorization} if authorization else {}
    status, _, body = http_get(f"{registry_url}/v2/{image.name}/manifests/{image.tag}", method="PUT", data=index,
                               headers={"Content-Type": OCI_INDEX, **auth})
    assert status == 201, body
    image.index_digest = "sha256:" + hashlib.sha256(index).hexdigest()


def pull(registry_host: str, reference: str, destination: Path, *options: str, enter: tuple[str, ...] = ()) -> str:
    """skopeo copy (with `options`, e.g. --all) of `reference` through the proxy into an OCI
    layout; returns the digest it stored: the image's manifest (or, with --all, its index)."""
    result = skopeo("copy", "--src-tls-verify=false", *options, f"docker://{registry_host}/{reference}",
                    f"oci:{destination}", enter=enter)
    assert result.returncode == 0, result.stderr
    index = json.loads((destination / "index.json").read_text())
    return index["manifests"][0]["digest"]


def random_chunks(size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """`size` incompressible bytes, a chunk at a time: big blobs never sit whole in memory."""
    for offset in range(0, size, chunk):
        yield os.urandom(min(chunk, size - offset))


def push_blob(registry_url: str, repository: str, chunks: Iterable[bytes], timeout: float = 60) -> str:
    """Upload a blob with the registry's chunked-upload API, streaming it; returns its digest.

    One POST opens the upload, one PATCH streams every chunk (chunked transfer encoding, so the
    size need not be known), and a PUT names the digest, hashed on the way. A blob served by
    GET /v2/<repository>/blobs/<digest> needs no manifest.
    """
    connection = http.client.HTTPConnection(urlsplit(registry_url).netloc, timeout=timeout)
    digest = hashlib.sha256()

    def hashed() -> Iterator[bytes]:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk

    def send(method: str, target: str, expected: int, **kwargs) -> str:
        connection.request(method, target, **kwargs)
        response = connection.getresponse()
        body = response.read()
        if response.status != expected:
            raise RuntimeError(f"{method} {target}: {response.status} {body[:200]!r}")
        location = urlsplit(response.getheader("Location", ""))
        return location.path + (f"?{location.query}" if location.query else "")

    try:
        upload = send("POST", f"/v2/{repository}/blobs/uploads/", 202, headers={"Content-Length": "0"})
        upload = send("PATCH", upload, 202, body=hashed(), encode_chunked=True,
                      headers={"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked"})
        name = f"sha256:{digest.hexdigest()}"
        send("PUT", f"{upload}{'&' if '?' in upload else '?'}digest={name}", 201, headers={"Content-Length": "0"})
        return name
    finally:
        connection.close()


def child_pids(parent: int) -> list[int]:
    """Direct children of a process, from /proc (ppid is the 4th field of /proc/PID/stat)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone while we looked
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def kill_if_still_running(pid: int, argv: list[str], timeout: float = 10.0) -> None:
    """SIGKILL `pid` if it still runs `argv` (not a new process given a reused pid), and wait
    until it has exited, its sockets closed (it is not our child: its parent or init reaps it)."""
    try:
        if command_line(pid) != argv:
            return
        os.kill(pid, signal.SIGKILL)
    except OSError:
        return  # gone already
    if not poll(lambda: has_exited(pid), bool, timeout):
        raise TimeoutError(f"process {pid} ({argv[0]}) still runs {timeout}s after SIGKILL")


def has_exited(pid: int) -> bool:
    """Gone, or a zombie in every thread. A killed process loses its memory (and command line)
    first, and its files (sockets) only when its last thread has exited."""
    try:
        tasks = [task.read_text().rsplit(")", 1)[1].split()[0] for task in Path(f"/proc/{pid}/task").glob("*/stat")]
    except OSError:
        return True
    return all(state in ("Z", "X") for state in tasks)


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # the kernel writes kB (KiB)
    return values


class Stack:
    """`regcache up`, run the way a user runs it, with settings passed as environment."""

    def __init__(self, workdir: Path, settings: dict[str, str], args: tuple[str, ...] = (),
                 enter: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        port = int(settings.get("REGCACHE_PORT", "5000"))
        self.args = args  # extra arguments of `regcache up`, e.g. --web
        self.enter = enter  # a command that runs `regcache up` where it belongs, e.g. in a namespace (cluster.py)
        self.settings = {
            "REGISTRY_DOMAIN": TEST_DOMAIN,
            "REGCACHE_DATA_DIR": str(workdir / "data"),
            # Stacks on different ports never share an egress, admin or data-plane port.
            "REGCACHE_EGRESS_PORT": str(port + 80),
            "REGCACHE_ADMIN_PORT": str(port + 70),
            "REGCACHE_DATAPLANE_PORT": str(port + 50),
            **settings,
        }
        self.port = port
        self.output: list[str] = []
        self.process: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None

    @property
    def data_dir(self) -> Path:
        return Path(self.settings["REGCACHE_DATA_DIR"])

    @property
    def pull_log(self) -> Path:
        return self.data_dir / "pull.log"

    def start(self, timeout: float = 60.0) -> "Stack":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings}
        self.process = subprocess.Popen(
            [*self.enter, *REGCACHE, "up", *self.args],
            cwd=self.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        ready = threading.Event()

        def read_output() -> None:
            for line in self.process.stdout:
                self.output.append(line.rstrip("\n"))
                if line.startswith("regcache is ready"):
                    ready.set()

        self.reader = threading.Thread(target=read_output, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("regcache up did not get ready:\n" + "\n".join(self.output))
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM, as a user stops it. Its children run in sessions of their own, so any left
        when it has gone (it was killed after the timeout, or did not stop one) are killed too:
        none may keep a port of the next stack busy. `sig` is SIGINT for a Ctrl-C."""
        if not self.process:
            return None
        running = self.process.poll() is None
        children = {pid: command_line(pid) for pid in child_pids(self.process.pid)} if running else {}
        stop_process(self.process, timeout=20, sig=sig)
        for pid, argv in children.items():
            kill_if_still_running(pid, argv)
        self.reader.join(5)  # `output` then holds all it said, to its last line
        return self.process.returncode

    def command(self, *args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
        """`regcache ARGS` with this stack's settings."""
        return subprocess.run([*REGCACHE, *args], cwd=self.workdir, env={**os.environ, **self.settings},
                              stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60)

    def client_config(self, out: Path, *args: str) -> Path:
        """`regcache client-config --out OUT [ARGS]` with this stack's settings; returns OUT."""
        result = self.command("client-config", "--out", str(out), *args)
        assert result.returncode == 0, result.stderr
        return out

    def pull_records_until(self, done, timeout: float = 10.0) -> list[dict]:
        """The pull log once `done(records)` holds: a record is written just after its response ended."""
        return poll(self.pull_records, done, timeout)

    def records_after(self, before: int) -> list[dict]:
        """The records after the first `before`, once there is at least one."""
        return self.pull_records_until(lambda records: len(records) > before)[before:]

    def records_of_pull(self, image: "TestImage", before: int = 0, registry: str | None = None) -> list[dict]:
        """The records after the first `before` (of `registry`, if given), once they show every
        blob of `image` served with 200: what one pull of it left in the log."""
        def mine(records: list[dict]) -> list[dict]:
            return [r for r in records[before:] if registry in (None, r["registry"])]

        def served_blobs(records: list[dict]) -> set[str]:
            return {r["reference"] for r in mine(records) if (r["method"], r["kind"], r["status"]) == ("GET", "blob", 200)}

        return mine(self.pull_records_until(lambda records: set(image.blob_digests) <= served_blobs(records)))

    @property
    def admin_port(self) -> int:
        return int(self.settings["REGCACHE_ADMIN_PORT"])

    def admin(self, path: str) -> tuple[int, dict, bytes]:
        """GET `path` of its admin endpoint, with its REGCACHE_ADMIN_TOKEN if it has one."""
        host = self.settings.get("REGCACHE_ADMIN_HOST", "127.0.0.1")
        token = self.settings.get("REGCACHE_ADMIN_TOKEN")
        return http_get(f"http://{host}:{self.admin_port}{path}", timeout=10,
                        headers={"Authorization": f"Bearer {token}"} if token else None)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """/metrics as {(sample name, sorted label items): value}."""
        status, _, body = self.admin("/metrics")
        assert status == 200
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def child(self, program: str) -> int:
        """The pid of the child of `regcache up` running `program` (itself, or as a Python script)."""
        for pid in child_pids(self.process.pid):
            if Path(program).name in (Path(arg).name for arg in command_line(pid)[:2]):
                return pid
        raise LookupError(f"regcache up has no child running {program}")

    def cache_access_log(self, registry_key: str = "dockerhub") -> list[AccessLine]:
        """What the cache `regcache up` runs for a registry (its K, lower case) was asked."""
        return read_access_log(self.data_dir / registry_key / "registry.log")

    def pull_records(self) -> list[dict]:
        if not self.pull_log.exists():
            return []
        return [json.loads(line) for line in self.pull_log.read_text().splitlines() if line.strip()]


def cache_holds(storage: Path, digest: str, timeout: float = 15) -> bool:
    """registry:2 commits a proxied blob to its storage just after it finished serving it."""
    hex_digest = digest.split(":")[1]
    path = storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"
    deadline = time.monotonic() + timeout
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    return path.is_file()


def storage_bytes(root: Path) -> int:
    """Bytes of every file under a cache's storage: what its disk budget counts."""
    return sum(path.lstat().st_size for path in root.rglob("*") if path.is_file())


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, source: str | None = None,
                 address: str = "127.0.0.1") -> bytes:
    """Send bytes as they are (no HTTP library to tidy them) to `address`, from address `source`
    if given, and return all that comes back until the server closes the connection."""
    received = bytearray()  # bytes += bytes would copy a 100 MiB answer 1600 times
    source_address = (source, 0) if source else None
    with socket.create_connection((address, port), timeout=timeout, source_address=source_address) as conn:
        conn.sendall(data)
        try:
            while chunk := conn.recv(1 << 20):
                received += chunk
        except ConnectionResetError:
            pass  # a server dropping a bad client may reset rather than close
    return bytes(received)


def raw_request(first_line: str, *headers: str, host: str, close: bool = True) -> bytes:
    """An HTTP/1 request head as bytes, for raw_exchange; `close=False` to send another after it."""
    lines = [first_line, f"Host: {host}", *headers, *(["Connection: close"] if close else []), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def split_responses(reply: bytes, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """Split what came back on one connection into (status, headers, body) per request, the way
    a client does: a HEAD's answer has no body, any other's is Content-Length bytes long."""
    answers = []
    for method in methods:
        head, separator, reply = reply.partition(b"\r\n\r\n")
        assert separator, f"no complete answer for {method}: {head[:200]!r}"
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), f"not an answer: {status_line[:200]!r}"
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
        length = 0 if method == "HEAD" else int(headers.get("content-length", "0"))
        answers.append((int(status_line.split()[1]), headers, reply[:length]))
        reply = reply[length:]
    assert reply == b"", f"bytes after the last answer: {reply[:200]!r}"
    return answers


def get_following_the_307(port: int, path: str, host: str, timeout: float = 120,
                          address: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """A blob GET from regcache at `address` on raw sockets, as a registry client makes it: the
    proxy's answer, and when it is a 307 to the data plane, that URL's (at its host and port).
    Returns the last answer's status, headers and body as received (a connection cut short
    leaves it short)."""
    first = raw_exchange(port, raw_request(f"GET {path} HTTP/1.1", host=host), timeout, address=address)
    [(status, headers, body)] = split_responses(first, ["GET"])
    if status != 307:
        return status, headers, body
    location = urlsplit(headers["location"])
    reply = raw_exchange(location.port, raw_request(f"GET {location.path}?{location.query} HTTP/1.1",
                                                    host=location.netloc), timeout, address=location.hostname)
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


def at_once(count: int, work) -> list:
    """work(index) in `count` threads started together (as many clients of a rollout); their results."""
    results: list = [None] * count
    start = threading.Barrier(count)

    def run(index: int) -> None:
        start.wait()
        results[index] = work(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def blob_bytes(upstream: Upstream, digest: str) -> bytes:
    """A blob as the upstream stores it."""
    hex_digest = digest.split(":")[1]
    return (upstream.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data").read_bytes()


def docker_io_stack(workdir: Path, upstream: Upstream, port: int, settings: dict | None = None,
                    args: tuple[str, ...] = ()) -> Stack:
    """`regcache up` caching docker.io only, from `upstream`, its cache on port+1."""
    return Stack(workdir, {
        "REGCACHE_PORT": str(port),
        "REGCACHE_REGISTRIES": "DOCKERHUB",
        "DOCKERHUB_UPSTREAM": upstream.url,
        "DOCKERHUB_CACHE": f"http://127.0.0.1:{port + 1}",
        **(settings or {}),
    }, args)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, host: str | None = None, method: str = "GET", timeout: float = 30,
             headers: dict | None = None, data: bytes | None = None) -> tuple[int, dict, bytes]:
    """One HTTP request; returns (status, headers, body) whatever the status."""
    request = urllib.request.Request(url, method=method, data=data, headers=dict(headers or {}))
    if host:
        request.add_header("Host", host)
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
