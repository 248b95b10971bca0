"""client_access.py without mitmproxy: networks, Basic credentials, the htpasswd file."""

from __future__ import annotations

import base64
import ipaddress
import os
import subprocess

import pytest

from regcache_core.access.clients import VERIFIED_TTL, ClientNetworks, Htpasswd, basic_credentials
from regcache_core.config import DEFAULTS, ConfigError, parse_config


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def htpasswd_line(user: str, password: str) -> str:
    return subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize("address, allowed", [
    ("10.1.2.3", True), ("10.255.0.1", True), ("11.0.0.1", False), ("::ffff:10.1.2.3", True),
    ("fd00::7", True), ("fe80::1%eth0", False), ("192.168.1.7", True), ("192.168.1.8", False), ("not-an-ip", False),
])
def test_networks_admit_their_addresses_only(address, allowed):
    networks = ClientNetworks(parse_config({**DEFAULTS, "REGCACHE_CLIENTS": "10.0.0.0/8, fd00::/8,192.168.1.7"}).client_networks)
    assert networks.allows(address) is allowed


def test_no_networks_admit_everyone():
    assert ClientNetworks().allows("203.0.113.9")


@pytest.mark.parametrize("value", ["10.0.0.0/33", "example.com", "10.0.0.0/8;"])
def test_a_bad_network_names_the_variable(value):
    with pytest.raises(ConfigError, match="^REGCACHE_CLIENTS: .* is not a network"):
        parse_config({**DEFAULTS, "REGCACHE_CLIENTS": value})


def test_networks_are_parsed_as_networks():
    config = parse_config({**DEFAULTS, "REGCACHE_CLIENTS": "10.1.2.3/8"})
    assert config.client_networks == (ipaddress.ip_network("10.0.0.0/8"),)


def test_htpasswd_must_be_readable(tmp_path):
    with pytest.raises(ConfigError, match="^REGCACHE_HTPASSWD: .* is not a file regcache can read"):
        parse_config({**DEFAULTS, "REGCACHE_HTPASSWD": str(tmp_path / "missing")})


@pytest.mark.parametrize("value, expected", [
    (basic("u:p"), ("u", "p")), (basic("u:p:q"), ("u", "p:q")), ("basic " + base64.b64encode(b"u:").decode(), ("u", "")),
    (basic("no-colon"), None), (basic(":p"), None), ("Basic !!!", None), ("Bearer x", None), (None, None), ("", None),
    ("Basic " + base64.b64encode(b"\xff:p").decode(), None), ("Basic " + "A" * 5000, None),
])
def test_basic_credentials(value, expected):
    assert basic_credentials(value) == expected


def test_repository_patterns(tmp_path):
    config = parse_config({**DEFAULTS, "DOCKERHUB_REPOSITORIES": "library/*, team/app-?"})
    docker_io = config.registry("docker.io")
    assert docker_io.serves("library/nginx") and docker_io.serves("library/a/b") and docker_io.serves("team/app-1")
    assert not docker_io.serves("team/app-10") and not docker_io.serves("other/x")
    assert config.registry("ghcr.io").serves("anything/at/all")
    with pytest.raises(ConfigError, match="^DOCKERHUB_REPOSITORIES: 'Library/\\*' is not a repository pattern"):
        parse_config({**DEFAULTS, "DOCKERHUB_REPOSITORIES": "Library/*"})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_htpasswd_verifies_remembers_and_rereads(tmp_path, caplog):
    path = tmp_path / "htpasswd"
    path.write_text(f"{htpasswd_line('alice', 'a-pass')}\nbob:$apr1$abc$def\n# comment\n")
    clock = Clock()
    accounts = Htpasswd(path, clock)
    good = basic("alice:a-pass")
    assert accounts.known(good) is None  # not verified yet
    assert accounts.verify(good) == "alice"
    assert accounts.known(good) == "alice"
    assert accounts.verify(basic("alice:wrong")) is None and accounts.known(basic("alice:wrong")) is None
    assert accounts.verify(basic("bob:anything")) is None
    assert "'bob' has no bcrypt hash" in caplog.text
    clock.now += VERIFIED_TTL + 1
    assert accounts.known(good) is None  # verified again after a while
    # The file changed: alice is gone.
    path.write_text(htpasswd_line("carol", "c-pass") + "\n")
    os.utime(path, ns=(1, 1))
    assert accounts.verify(good) is None
    assert accounts.verify(basic("carol:c-pass")) == "carol"


def test_htpasswd_keeps_its_accounts_while_the_file_is_away(tmp_path, caplog):
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_line("alice", "a-pass") + "\n")
    accounts = Htpasswd(path)
    assert accounts.verify(basic("alice:a-pass")) == "alice"
    path.unlink()
    assert accounts.verify(basic("alice:a-pass")) == "alice"
    assert "cannot read REGCACHE_HTPASSWD" in caplog.text
