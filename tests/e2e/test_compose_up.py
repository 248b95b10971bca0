"""docker-compose.yml run for real: images built, `docker-compose up`, pulls, logs, `down -v`.

Docker Hub is out of reach, so the images are made offline-capable: a Debian base from
debootstrap (kept in pytest's cache between runs), a python:3.11-slim-bookworm stand-in on it,
the repo's Dockerfile on that (its BASE build argument), and a registry:2 stand-in from
Debian's docker-registry (tests/e2e/compose/). They are built on a dockerd in the machine's network
namespace with no bridge and no iptables rules (`docker build --network host`: the builds reach
the package registries and nothing else). A second dockerd, on the same image store inside this
process's private namespaces, runs the repo's docker-compose.yml unchanged: an override file
only adds an upstream (a registry:2 serving the session upstream's storage) and points the
proxy's docker.io at it. That dockerd is also the Docker client that pulls through the
published port, as skopeo does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.clients import Dockerd
from tests.support.parts import REPO, TEST_DOMAIN, host_network_namespace, poll, pull, read_access_log

STAND_INS = Path(__file__).parent / "compose"
MACHINE_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's bundle of the certificates it trusts
BASE_IMAGE = "regcache-test/debian:bookworm"
PYTHON_IMAGE = "regcache-test/python:3.11-slim-bookworm"
PROXY_IMAGE = "regcache-test/regcache"
PROJECT = "regcachetest"
PROXY = "registry-cache"
HOST = f"docker.io.{TEST_DOMAIN}:5000"  # the published port, as clients name it
OVERRIDE = """\
services:
  registry-cache:
    image: {proxy_image}
    environment:
      DOCKERHUB_UPSTREAM: http://upstream:5000
    depends_on: [upstream]
  upstream:
    image: registry:2
    networks: [registry-cache]
    volumes: ["{upstream_storage}:/var/lib/registry:ro"]
    environment:
      REGISTRY_HTTP_DRAINTIMEOUT: 10s  # as the caches have it: exit 0 on SIGTERM
"""


def debian_mirror() -> str:
    """The machine's Debian mirror for bookworm, from its apt sources (one-line or deb822)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for text in (path.read_text() for path in sources if path.is_file()):
        for line in text.splitlines():
            if (words := line.split()) and words[0] == "deb" and "bookworm" in words:
                return next(w for w in words[1:] if "://" in w)
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
            if "bookworm" in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    raise RuntimeError("no Debian bookworm mirror in /etc/apt/sources.list*")


def in_host_network(*command: str) -> list[str]:
    return ["nsenter", f"--net={host_network_namespace()}", *command]


def base_tarball(cache: Path) -> Path:
    """A minbase bookworm root as a tarball for `docker import`, made once per machine."""
    tarball = cache / "debian-bookworm-minbase.tar"
    if not tarball.exists():
        root = cache / "rootfs"
        shutil.rmtree(root, ignore_errors=True)
        result = subprocess.run(in_host_network("debootstrap", "--variant=minbase", "bookworm", str(root), debian_mirror()),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        subprocess.run(["tar", "-C", str(root), "-cf", f"{tarball}.part", "."], check=True, timeout=300)
        Path(f"{tarball}.part").rename(tarball)  # a run cut short leaves no half tarball
        shutil.rmtree(root)
    return tarball


def build(dockerd: Dockerd, tag: str, context: Path, base: str) -> None:
    # The legacy builder: Debian 12's engine has no BuildKit front end for a client without buildx.
    result = dockerd.docker("build", "--network", "host", "--build-arg", f"BASE={base}", "-t", tag, str(context),
                            timeout=600, env={"DOCKER_BUILDKIT": "0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


class Compose:
    """`docker-compose` on the project: the repo's file, the override, a .env of the test's."""

    def __init__(self, project_dir: Path, dockerd: Dockerd) -> None:
        self.project_dir, self.dockerd = project_dir, dockerd
        self.timings: dict[str, float] = {}  # seconds, for the report the first test prints

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        files = ["-f", str(REPO / "docker-compose.yml"), "-f", str(self.project_dir / "override.yml")]
        return subprocess.run(
            ["docker-compose", "-p", PROJECT, *files, "--project-directory", str(self.project_dir), *args],
            capture_output=True, text=True, timeout=timeout, env={**os.environ, "DOCKER_HOST": f"unix://{self.dockerd.socket}"},
        )

    def containers(self) -> dict[str, dict]:
        """Every container of the project, by service, as `docker inspect` shows it."""
        ids = self("ps", "-q", "-a").stdout.split()
        inspected = json.loads(self.dockerd.docker("inspect", *ids).stdout) if ids else []
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in inspected}

    def logs(self, service: str) -> str:
        result = self("logs", "--no-color", service)
        return result.stdout + result.stderr


def health(compose: Compose) -> dict[str, str]:
    return {service: c["State"].get("Health", {}).get("Status", "none") for service, c in compose.containers().items()}


def health_report(compose: Compose) -> str:
    """What each healthcheck last said, and the end of each service's log: why it isn't healthy."""
    lines = []
    for service, container in compose.containers().items():
        checks = container["State"].get("Health", {}).get("Log", [])
        lines.append(f"{service}: {checks[-1:]}\n{compose.logs(service)[-1500:]}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def compose(request, tmp_path_factory, upstream):
    """The compose project up and healthy; `down -v` and every daemon and image store gone after."""
    workdir = tmp_path_factory.mktemp("compose-up")
    tarball = base_tarball(request.config.cache.mkdir("compose-base"))
    daemon_json = workdir / "daemon.json"
    daemon_json.write_text(json.dumps({"registry-mirrors": [f"http://{HOST}"], "insecure-registries": [HOST]}))
    project_dir = workdir / "project"
    project_dir.mkdir()
    (project_dir / ".env").write_text((REPO / ".env.example").read_text() + f"REGISTRY_DOMAIN={TEST_DOMAIN}\n")
    (project_dir / "override.yml").write_text(OVERRIDE.format(proxy_image=PROXY_IMAGE, upstream_storage=upstream.storage))
    docker_root = workdir / "docker"
    timings = {}
    started = time.monotonic()
    dockerd = Dockerd(docker_root, daemon_json, network_namespace=host_network_namespace(), storage_driver="overlay2")
    try:
        dockerd.start()
        result = dockerd.docker("import", str(tarball), BASE_IMAGE, timeout=300)
        assert result.returncode == 0, result.stderr
        python_context = shutil.copytree(STAND_INS / "python", workdir / "python")
        shutil.copy(MACHINE_CA, python_context / "machine-ca.crt")
        build(dockerd, PYTHON_IMAGE, python_context, BASE_IMAGE)
        build(dockerd, "registry:2", STAND_INS / "registry", BASE_IMAGE)  # under the name the compose file asks for
        build(dockerd, PROXY_IMAGE, REPO, PYTHON_IMAGE)
    finally:
        dockerd.stop()
    timings["build"] = time.monotonic() - started
    dockerd = Dockerd(docker_root, daemon_json, storage_driver="overlay2")  # on the same image store, in this process's namespaces
    try:
        dockerd.start()
        project = Compose(project_dir, dockerd)
        started = time.monotonic()
        result = project("up", "-d", "--no-build", timeout=180)
        assert result.returncode == 0, result.stderr
        states = poll(lambda: health(project), lambda states: not set(states.values()) & {"starting", "unhealthy"},
                      timeout=150, every=2)
        assert set(states.values()) == {"healthy", "none"}, health_report(project)
        timings["healthy"] = time.monotonic() - started
        project.timings.update(timings)
        yield project
        result = project("down", "-v", "-t", "20", timeout=120)
        assert result.returncode == 0, result.stderr
        assert dockerd.docker("volume", "ls", "-q").stdout.split() == []
        assert [n for n in dockerd.docker("network", "ls", "--format", "{{.Name}}").stdout.split() if n not in ("host", "none")] == []
    finally:
        dockerd.stop()
        shutil.rmtree(docker_root, ignore_errors=True)  # the image store: gigabytes with vfs
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(workdir) in line]
    interfaces = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10).stdout
    assert [line.split(":")[1].strip() for line in interfaces.splitlines()] == ["lo"]


def test_every_service_becomes_healthy(compose):
    states = health(compose)
    print(f"compose: images built in {compose.timings['build']:.0f} s, healthy {compose.timings['healthy']:.0f} s after up")
    assert states == {PROXY: "healthy", "registry-dockerhub": "healthy", "registry-ghcr": "healthy",
                      "registry-quay": "healthy", "upstream": "none"}


def upstream_blob_gets(compose: Compose, log_file: Path) -> list[str]:
    log_file.write_text(compose.logs("upstream"))
    return [line.path for line in read_access_log(log_file) if "/blobs/" in line.path and line.method == "GET"]


def test_skopeo_and_docker_pull_through_the_published_port_and_the_second_pull_is_cached(compose, images, tmp_path):
    image = images["small"]
    assert pull(HOST, image.reference, tmp_path / "skopeo") == image.manifest_digest
    fetched = upstream_blob_gets(compose, tmp_path / "upstream.log")
    assert set(fetched) == {f"/v2/{image.name}/blobs/{digest}" for digest in image.blob_digests}
    # Docker Hub is out of reach here: the dockerd can only pull through its mirror.
    result = compose.dockerd.docker("pull", f"docker.io/{image.reference}")
    assert result.returncode == 0, result.stderr
    assert compose.dockerd.inspect(f"docker.io/{image.reference}")["Id"] == image.blob_digests[0]
    print(f"compose: upstream blob GETs {len(fetched)} for {len(image.blob_digests)} blobs")
    assert upstream_blob_gets(compose, tmp_path / "upstream.log") == fetched, "the second pull came from the cache"


def test_pull_log_on_the_volume_records_the_pulls(compose, images):
    image = images["small"]
    result = compose("exec", "-T", PROXY, "cat", "/data/pull.log")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    pulled = {(r["kind"], r["reference"], r["status"]) for r in records if r["repository"] == image.name}
    assert ("manifest", "1.0", 200) in pulled
    assert {("blob", digest, 200) for digest in image.blob_digests} <= pulled


def test_proxy_warnings_reach_docker_logs_at_once(compose):
    # A container on the internal network that is not docker.io's cache asks its egress listener.
    compose("exec", "-T", "registry-ghcr", "wget", "-q", "--spider", f"http://{PROXY}:5080/v2/")
    logs = poll(lambda: compose.dockerd.docker("logs", PROXY).stderr + compose.dockerd.docker("logs", PROXY).stdout,
                lambda text: "egress listener of docker.io" in text, timeout=10, every=0.5)
    assert re.search(r"refused \S+ on the egress listener of docker.io", logs), logs[-2000:]


def test_every_container_exits_0_on_sigterm(compose):
    result = compose("stop", "-t", "20")
    assert result.returncode == 0, result.stderr
    exits = {service: c["State"]["ExitCode"] for service, c in compose.containers().items()}
    assert exits == dict.fromkeys(exits, 0)
