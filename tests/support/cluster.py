"""Several `regcache up` replicas as one cache, the way Kubernetes runs them: issue 19's test bed.

    from tests.support.cluster import Cluster

    with Cluster(tmp_path, PORT_BASES["test_x"], replicas=3, settings={"REGCACHE_TAG_TTL": "5"}) as cluster:
        cluster.upstream.push(image)                        # seed its upstream
        pull(cluster.host, image.reference, destination)    # skopeo through HAProxy, the Service
        cluster.replicas[0].kill()                          # SIGKILL: the whole pod at once
        cluster.balancer.wait_for_rotation({1, 2})          # HAProxy's checks took it out
        cluster.replicas[0].start()                         # back: same address, same data dir
        cluster.redis.kill(); cluster.redis.start()         # Redis gone, then back (empty)

What runs where, for a port base B (a PORT_BASES entry). The test's own network namespace (the
one tests/e2e/conftest.py made: the "gateway") gets a bridge `br0` at 10.77.0.1/24 and runs:
- `cluster.upstream`: a parts.Upstream on 10.77.0.1:B+1000, empty until the test pushes to it;
- `cluster.redis`: a redis_server.RedisServer on 10.77.0.1:B+60 with a password
  (`cluster.redis.url`), `maxmemory-policy noeviction`, nothing saved;
- `cluster.balancer`: HAProxy on port B of every gateway address, passing TCP connections
  round-robin to the replicas' port B (an L4 balancer, as a Service is); a replica is in rotation
  while its /ready answers 200, as a Service's endpoints follow readiness. `cluster.host` is
  `docker.io.regcache.test:B`: the suite's /etc/hosts resolves it to 127.0.0.1, i.e. HAProxy.
- `cluster.storage`: one directory every replica's cache of docker.io keeps its storage in.

Replica i (`cluster.replicas[i]`, a parts.Stack) is a whole `regcache up` in a network namespace
of its own, joined to the bridge by a veth, at 10.77.0.(11+i) (`replica.address`). Its loopback
is its own, so every replica uses the same ports, as pods do: clients on B, its cache on B+1,
data plane on B+50, egress on B+80, its admin endpoint on its address at B+70 (with a token,
which `replica.admin(path)` sends). Its settings, before the `settings` given (which win; an
empty value means the setting's default: `"REGCACHE_REDIS_URL": "", "REGCACHE_CLUSTER_SECRET": ""`
for no shared state): REGCACHE_DATAPLANE_URL=http://<its address>:B+50 (a 307 names the replica
that made it), DOCKERHUB_UPSTREAM=the upstream, DOCKERHUB_STORAGE=<cluster.storage>/dockerhub,
REGCACHE_REDIS_URL=cluster.redis.url, REGCACHE_CLUSTER_SECRET (the same for all), one data-plane
worker. It runs in a mount namespace of its own too, whose /etc/hosts names the suite's test
hosts at the gateway (as a pod resolves a Service's name): Go clients resolve names only through
/etc/hosts, and from a replica 127.0.0.1 is its own loopback.

- `replica.kill()` SIGKILLs every process in its network namespace at once (a pod gone);
  `replica.stop()` is a SIGTERM, as a rolling update sends; `replica.start()` or
  `cluster.start_replicas(indexes)` (several at once) starts it again.
- `replica.run(*command)` runs a command where the replica runs (e.g. curl to a peer).
- `with replica.cut_from(cluster.upstream.host, cluster.upstream.port):` resets that replica's
  connections to the upstream alone (an iptables rule in its namespace, gone with the block).
- `pull(cluster.host, ref, dest, enter=replica.pinned)` pulls from that replica alone, not
  through the balancer (the suite's test hosts at its address, for that command only).

Every wait here is bounded. `stop()` (leaving the `with` block) ends every process started, the
namespaces with them, and deletes the bridge and veths, whatever point start() reached. Needs
the e2e lane's namespaces (root).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from .parts import TEST_DOMAIN, UPSTREAM_OFFSET, Stack, Upstream, at_once, has_exited, poll, stop_process, wait_for_port
from .redis_server import RedisServer

BRIDGE = "br0"
SUBNET = "10.77.0"
GATEWAY = f"{SUBNET}.1"
FIRST_REPLICA = 11  # replica i is SUBNET.(FIRST_REPLICA + i)
REDIS_OFFSET = 60
DATAPLANE_OFFSET, ADMIN_OFFSET = 50, 70  # as parts.Stack puts them
START_TIMEOUT = 120.0  # seconds for a replica to say it is ready: three start at once on two cores


def run(*command: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)


class NetworkNamespace:
    """A network namespace held open by a `sleep` of ours, joined to the bridge by a veth: the
    namespace's end is eth0 at `address`/24, the gateway's end `veth` (on the bridge)."""

    def __init__(self, veth: str, address: str) -> None:
        self.veth, self.address = veth, address
        self.holder: subprocess.Popen | None = None

    @property
    def path(self) -> str:
        """For `nsenter --net=`."""
        return f"/proc/{self.holder.pid}/ns/net"

    def create(self) -> "NetworkNamespace":
        ours = os.readlink("/proc/self/ns/net")
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
        if poll(lambda: self._identity() or ours, lambda identity: identity != ours, timeout=10) == ours:
            raise TimeoutError(f"no network namespace of its own for {self.address} after 10s")
        self.identity = self._identity()
        run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", str(self.holder.pid))
        run("ip", "link", "set", self.veth, "master", BRIDGE, "up")
        for command in (("link", "set", "lo", "up"), ("addr", "add", f"{self.address}/24", "dev", "eth0"),
                        ("link", "set", "eth0", "up")):
            run("nsenter", f"--net={self.path}", "ip", *command)
        return self

    def _identity(self) -> str | None:
        try:
            return os.readlink(self.path)
        except OSError:
            return None

    def processes(self) -> list[int]:
        """Every process in it but the holder."""
        pids = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if os.readlink(entry / "ns/net") == self.identity and int(entry.name) != self.holder.pid:
                    pids.append(int(entry.name))
            except OSError:
                continue  # gone, or a zombie: its namespaces went with it
        return pids

    def kill_processes(self, timeout: float = 15) -> None:
        """SIGKILL every process in it (those a kill races with too) and wait until all have exited."""
        if not self.holder:
            return  # never made, or deleted with everything in it
        deadline = time.monotonic() + timeout
        while pids := self.processes():
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {pids} still run in {self.address}'s namespace {timeout}s after SIGKILL")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass  # gone meanwhile
            poll(lambda: all(has_exited(pid) for pid in pids), bool, timeout=2)

    def delete(self) -> None:
        if self.holder:
            self.kill_processes()
            stop_process(self.holder, sig=signal.SIGKILL)
            self.holder = None
        # Gone with the namespace's end (once the kernel has torn it down); no error if so.
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, timeout=10)


def hosts_naming_test_hosts_at(address: str) -> str:
    """The suite's /etc/hosts with its test names at `address` instead of loopback."""
    names = [name for line in Path("/etc/hosts").read_text().splitlines() if line.startswith("127.0.0.1")
             for name in line.split()[1:] if name != "localhost"]
    return f"127.0.0.1 localhost\n::1 localhost\n{address} {' '.join(names)}\n"


def with_hosts(hosts_file: Path) -> tuple[str, ...]:
    """A command prefix: the command runs in a mount namespace of its own with `hosts_file` as /etc/hosts."""
    # The suite's /etc/hosts is a bind mount of a file deleted since (conftest.py): nothing can be
    # mounted on a deleted file, so that mount goes first (in the new namespace only).
    return ("unshare", "--mount", "sh", "-c", 'umount /etc/hosts && mount --bind "$0" /etc/hosts && exec "$@"',
            str(hosts_file))


class Replica(Stack):
    """One `regcache up` in a network namespace (and mount namespace) of its own."""

    def __init__(self, index: int, workdir: Path, settings: dict[str, str], namespace: NetworkNamespace,
                 hosts_file: Path) -> None:
        super().__init__(workdir, settings, enter=("nsenter", f"--net={namespace.path}", *with_hosts(hosts_file)))
        self.index, self.namespace = index, namespace
        pinned_hosts = workdir.parent / f"pinned-to-{index}-hosts"
        pinned_hosts.write_text(hosts_naming_test_hosts_at(namespace.address))
        # A command prefix: a client in the gateway whose /etc/hosts names the suite's test hosts
        # at this replica, e.g. `pull(cluster.host, ref, dest, enter=replica.pinned)`: it pulls
        # from this replica alone, not through the balancer.
        self.pinned = with_hosts(pinned_hosts)

    @property
    def address(self) -> str:
        return self.namespace.address

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A command where this replica runs (its network, its /etc/hosts), e.g. curl to a peer."""
        return subprocess.run([*self.enter, *command], capture_output=True, text=True, timeout=timeout)

    @contextlib.contextmanager
    def cut_from(self, host: str, port: int):
        """Within the block, this replica's connections to host:port are reset (a rule in its own
        namespace), as when its node's route there is broken while the others' is not."""
        rule = ("OUTPUT", "-p", "tcp", "-d", host, "--dport", str(port), "-j", "REJECT", "--reject-with", "tcp-reset")
        run("nsenter", f"--net={self.namespace.path}", "iptables", "-A", *rule)
        try:
            yield
        finally:
            run("nsenter", f"--net={self.namespace.path}", "iptables", "-D", *rule)

    def kill(self) -> None:
        """SIGKILL every process of this replica at once, as when its pod or node dies."""
        self.namespace.kill_processes()
        if self.process:
            self.process.wait(10)
            self.reader.join(5)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        code = super().stop(sig)
        self.namespace.kill_processes()  # anything its children left behind
        return code


class Balancer:
    """HAProxy in TCP mode on `port`, round-robin over the replicas, each in rotation while its
    /ready answers 200 (checked every 0.5 s; out after 2 failures, back after 1 success). A
    connection refused is retried on another replica, as kube-proxy's endpoints would have
    dropped the pod by then."""

    def __init__(self, root: Path, port: int, replicas: list[tuple[str, int, int]], admin_token: str) -> None:
        self.root, self.port = root, port
        self.replicas = replicas  # (address, port, admin port)
        self.admin_token = admin_token
        self.process: subprocess.Popen | None = None

    @property
    def admin_socket(self) -> Path:
        return self.root / "admin.sock"

    def config(self) -> str:
        servers = "".join(f"  server replica-{i} {address}:{port} check port {admin_port}\n"
                          for i, (address, port, admin_port) in enumerate(self.replicas))
        return (
            "global\n"
            f"  stats socket {self.admin_socket} mode 600 level admin\n"
            "  log stdout format raw local0 info\n"
            "defaults\n"
            "  mode tcp\n  log global\n  option tcplog\n"
            "  timeout connect 2s\n  timeout client 10m\n  timeout server 10m\n  timeout check 2s\n"
            "  retries 3\n  option redispatch\n"
            "frontend clients\n"
            f"  bind :{self.port}\n"
            "  default_backend replicas\n"
            "backend replicas\n"
            "  balance roundrobin\n"
            "  option httpchk\n"
            f'  http-check send meth GET uri /ready hdr Authorization "Bearer {self.admin_token}"\n'
            "  http-check expect status 200\n"
            "  default-server inter 500ms fall 2 rise 1\n"
            f"{servers}"
        )

    def start(self, timeout: float = 10) -> "Balancer":
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "haproxy.cfg"
        config.write_text(self.config())
        self.admin_socket.unlink(missing_ok=True)  # a stopped one's; the new one is ready once it is there
        with open(self.root / "haproxy.log", "ab") as log:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, timeout=timeout)
            if not poll(self.admin_socket.exists, bool, timeout):
                raise TimeoutError
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"haproxy did not start:\n{(self.root / 'haproxy.log').read_text()[-2000:]}") from None
        return self

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)
            self.process = None

    def command(self, line: str) -> str:
        """One command on HAProxy's admin socket (e.g. "disable server replicas/replica-1"); its reply."""
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(5)
            connection.connect(str(self.admin_socket))
            connection.sendall(f"{line}\n".encode())
            reply = b""
            while chunk := connection.recv(65536):
                reply += chunk
        return reply.decode()

    def states(self) -> dict[int, str]:
        """Each replica's state as HAProxy's checks see it: "UP", "DOWN", or on the way ("UP 1/2")."""
        rows = csv.DictReader(self.command("show stat").removeprefix("# ").splitlines())
        return {int(row["svname"].removeprefix("replica-")): row["status"]
                for row in rows if row["pxname"] == "replicas" and row["svname"].startswith("replica-")}

    def in_rotation(self) -> set[int]:
        """The replicas new connections may go to."""
        return {index for index, state in self.states().items() if state.startswith("UP")}

    def wait_for_rotation(self, replicas: set[int], timeout: float = 30) -> None:
        """Until exactly `replicas` are in rotation, each settled (UP, not on its way down)."""
        settled = lambda states: {i for i, state in states.items() if state == "UP"} == replicas and all(  # noqa: E731
            state in ("UP", "DOWN", "MAINT") for state in states.values())
        states = poll(self.states, settled, timeout, every=0.2)
        if not settled(states):
            raise TimeoutError(f"HAProxy's replicas after {timeout}s: {states}, not {sorted(replicas)} up")


class Cluster:
    """The whole test bed: see the module's docstring."""

    def __init__(self, workdir: Path, port: int, replicas: int = 3, settings: dict[str, str] | None = None) -> None:
        self.workdir, self.port = workdir, port
        self.storage = workdir / "storage"
        self.upstream = Upstream(workdir / "upstream", port + UPSTREAM_OFFSET, host=GATEWAY)
        self.redis = RedisServer(workdir / "redis", port + REDIS_OFFSET, GATEWAY, password=secrets.token_hex(8))
        self.admin_token = secrets.token_hex(16)
        self.secret = secrets.token_hex(32)  # REGCACHE_CLUSTER_SECRET
        self.settings = settings or {}
        self.namespaces = [NetworkNamespace(f"rc-veth{i}", f"{SUBNET}.{FIRST_REPLICA + i}") for i in range(replicas)]
        self.balancer = Balancer(workdir / "haproxy", port, [
            (namespace.address, port, port + ADMIN_OFFSET) for namespace in self.namespaces], self.admin_token)
        self.replicas: list[Replica] = []
        self._bridge = False

    @property
    def host(self) -> str:
        """Where clients pull from: docker.io's virtual host at the balancer."""
        return f"docker.io.{TEST_DOMAIN}:{self.port}"

    def replica_settings(self, namespace: NetworkNamespace) -> dict[str, str]:
        return {
            "REGCACHE_PORT": str(self.port),
            "REGCACHE_REGISTRIES": "DOCKERHUB",
            "DOCKERHUB_UPSTREAM": self.upstream.url,
            "DOCKERHUB_CACHE": f"http://127.0.0.1:{self.port + 1}",
            "DOCKERHUB_STORAGE": str(self.storage / "dockerhub"),
            "REGCACHE_DATAPLANE_URL": f"http://{namespace.address}:{self.port + DATAPLANE_OFFSET}",
            "REGCACHE_DATAPLANE_WORKERS": "1",
            "REGCACHE_ADMIN_HOST": namespace.address,
            "REGCACHE_ADMIN_TOKEN": self.admin_token,
            "REGCACHE_REDIS_URL": self.redis.url,
            "REGCACHE_CLUSTER_SECRET": self.secret,
            **self.settings,
        }

    def start(self) -> "Cluster":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._bridge = True
        run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        self.upstream.start()
        self.redis.start()
        hosts_file = self.workdir / "replica-hosts"
        hosts_file.write_text(hosts_naming_test_hosts_at(GATEWAY))
        for index, namespace in enumerate(self.namespaces):
            namespace.create()
            self.replicas.append(Replica(index, self.workdir / f"replica-{index}", self.replica_settings(namespace),
                                         namespace, hosts_file))
        self.start_replicas(range(len(self.replicas)))
        self.balancer.start()
        self.balancer.wait_for_rotation(set(range(len(self.replicas))))

    def start_replicas(self, indexes) -> None:
        """Start these replicas at once (one after the other takes minutes of CPU-bound start-up
        work on a loaded machine); raises the first failure."""
        replicas = [self.replicas[i] for i in indexes]

        def start(k: int) -> BaseException | None:
            try:
                replicas[k].start(timeout=START_TIMEOUT)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                return e
            return None

        if failures := [failure for failure in at_once(len(replicas), start) if failure]:
            raise failures[0]

    def stop(self) -> None:
        """Every replica (SIGTERM, then whatever is left SIGKILLed), the balancer, Redis, the
        upstream, the namespaces and interfaces; safe to call at any point of start()."""
        for replica in self.replicas:
            replica.stop()
        self.balancer.stop()
        self.redis.stop()
        self.upstream.stop()
        for namespace in self.namespaces:
            namespace.delete()
        if self._bridge:
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, timeout=10)
            self._bridge = False

    def reads_registered(self, digest: str, urls: bool = False) -> bool:
        """Whether some replica's send of the blob is registered in Redis (cluster/reads.py); with
        `urls`, a URL of it handed out by a proxy instead (a member `<token>:url`)."""
        client = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        try:
            readers = client.zrange(f"regcache:reading:docker.io@{digest}", 0, -1)
        finally:
            client.close()
        return any(reader.endswith(b":url") == urls for reader in readers)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class SlowReader:
    """A client reading one blob from a replica's data plane as slowly as it likes: the replica
    answers the blob's GET with a 307 there, and the body is read on a raw socket with a small
    receive buffer, only in `read_to_the_end` (the data plane waits for it meanwhile)."""

    def __init__(self, replica_address: str, port: int, image, digest: str) -> None:
        connection = http.client.HTTPConnection(replica_address, port, timeout=30)
        connection.request("GET", f"/v2/{image.name}/blobs/{digest}", headers={"Host": f"docker.io.{TEST_DOMAIN}:{port}"})
        answer = connection.getresponse()
        location = urlsplit(answer.getheader("Location", ""))
        connection.close()
        assert (answer.status, location.path) == (307, "/_regcache/blob"), answer.headers  # a warm blob, by the data plane
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        self.socket.settimeout(60)
        self.socket.connect((location.hostname, location.port))
        self.socket.sendall(f"GET {location.path}?{location.query} HTTP/1.1\r\nHost: {location.netloc}\r\n\r\n".encode())
        self.head, self.body = b"", b""
        while b"\r\n\r\n" not in self.head:
            self.head += self.socket.recv(65536)
        self.head, _, self.body = self.head.partition(b"\r\n\r\n")
        assert self.head.startswith(b"HTTP/1.1 200"), self.head
        self.size = int(re.search(rb"(?i)content-length: *(\d+)", self.head).group(1))

    def read_to_the_end(self) -> str:
        while len(self.body) < self.size:
            chunk = self.socket.recv(1 << 20)
            assert chunk, f"cut after {len(self.body)} of {self.size} bytes"
            self.body += chunk
        self.socket.close()
        return "sha256:" + hashlib.sha256(self.body).hexdigest()

    def close(self) -> None:
        self.socket.close()
