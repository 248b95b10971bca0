"""Settings: the environment and `.env`, checked and turned into typed values.

Every variable is documented in `.env.example`. The real environment wins over `.env`,
and both win over `DEFAULTS`. A registry is a few variables sharing a prefix (its key):

    REGCACHE_REGISTRIES=DOCKERHUB,K8S
    K8S_REGISTRY=registry.k8s.io          # the name clients pull from
    K8S_UPSTREAM=https://registry.k8s.io  # where its images come from
    K8S_CACHE=http://127.0.0.1:5004       # its registry:2 cache, or "none" to pass through
    K8S_USERNAME= / K8S_PASSWORD=         # optional upstream credentials
    K8S_MAX_DISK=20G                      # optional: its cache's own disk budget
    K8S_STORAGE=/caches/k8s               # optional: its cache's storage, as this machine sees it

Caches never talk to an upstream themselves: each cached registry's cache uses an egress
listener of the proxy as its upstream, bound to REGCACHE_EGRESS_HOST, on port K_EGRESS_PORT if
set, else REGCACHE_EGRESS_PORT + the registry's position in REGCACHE_REGISTRIES (0-based). The
proxy adds credentials there.

The data plane (REGCACHE_DATAPLANE_*) sends warm blobs straight from a cache's storage: the
proxy answers a warm blob GET with a 307 to it. It needs the storage root of each cache
(K_STORAGE); for the caches `regcache up` runs that is <data dir>/<key lower>/storage.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

DEFAULTS: Mapping[str, str] = {
    "REGISTRY_DOMAIN": "registry.localhost",
    "REGCACHE_PORT": "5000",
    "REGCACHE_ADMIN_HOST": "127.0.0.1",
    "REGCACHE_ADMIN_PORT": "5070",
    "REGCACHE_WEB_MAX_FLOWS": "2000",
    "REGCACHE_WEB_PASSWORD": "",  # mitmweb's UI password (mitmproxy 11.1.2+); empty: a token per run
    "REGCACHE_DATA_DIR": "./data",
    "REGCACHE_PULL_LOG": "",  # empty: <data dir>/pull.log
    "REGCACHE_PULL_LOG_STDOUT": "false",
    "REGCACHE_EGRESS_HOST": "127.0.0.1",  # where caches reach the proxy; 0.0.0.0 in a container
    "REGCACHE_EGRESS_PORT": "5080",  # first egress port; registry N (0-based) gets this + N
    "REGCACHE_MAX_DISK": "",  # empty: no budget over all caches
    "REGCACHE_MIN_FREE_DISK": "1G",  # a cache's disk with less free is reported not ready
    "REGCACHE_STOP_GRACE": "30",  # seconds pulls in flight get to finish after SIGTERM
    "REGCACHE_TAG_TTL": "60",  # seconds a tag's digest is served without asking upstream
    "REGCACHE_MANIFEST_CACHE": "8M",  # manifest bodies kept in memory
    "REGCACHE_UPSTREAM_TIMEOUT": "5",  # seconds to an upstream's first byte, name lookup included
    "REGCACHE_DATAPLANE": "true",
    "REGCACHE_DATAPLANE_HOST": "",  # empty: all interfaces, like the client listener
    "REGCACHE_DATAPLANE_PORT": "5050",
    "REGCACHE_DATAPLANE_URL": "",  # empty: the host name the client used, on REGCACHE_DATAPLANE_PORT
    "REGCACHE_DATAPLANE_MIN_SIZE": "256k",  # see bench_handoff.py
    "REGCACHE_DATAPLANE_WORKERS": "",  # empty: one per core
    "REGCACHE_SPOOL_MAX_DISK": "10G",  # cold blobs being fetched upstream, spooled for concurrent fetches
    "REGCACHE_REGISTRIES": "DOCKERHUB,GHCR,QUAY",
    "REGCACHE_CLIENTS": "",  # empty: any address
    "REGCACHE_HTPASSWD": "",  # empty: no accounts needed
    "REGCACHE_ADMIN_TOKEN": "",  # empty: none asked (then the admin endpoint must be on loopback)
    "REGCACHE_MAX_CONNECTIONS_PER_CLIENT": "256",  # open connections one client address may hold
    "REGCACHE_HEAD_TIMEOUT": "10",  # seconds a connection gets to send a whole request head
    "DOCKERHUB_REGISTRY": "docker.io",
    "DOCKERHUB_UPSTREAM": "https://registry-1.docker.io",
    "DOCKERHUB_CACHE": "http://127.0.0.1:5001",
    "GHCR_REGISTRY": "ghcr.io",
    "GHCR_UPSTREAM": "https://ghcr.io",
    "GHCR_CACHE": "http://127.0.0.1:5002",
    "QUAY_REGISTRY": "quay.io",
    "QUAY_UPSTREAM": "https://quay.io",
    "QUAY_CACHE": "http://127.0.0.1:5003",
}

# A registry's own variables: <KEY>_REGISTRY and so on.
REGISTRY_SETTINGS = ("REGISTRY", "UPSTREAM", "CACHE", "USERNAME", "PASSWORD", "EGRESS_PORT", "REPOSITORIES", "MAX_DISK", "STORAGE", "TOKEN_REALMS")

_KEY = re.compile(r"[A-Z][A-Z0-9_]*")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# A registry name as containerd writes it in ?ns=: a host name, optionally with a port.
_REGISTRY_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?")
_NUMBER = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() accepts "²", which int() rejects
# A size: bytes, or a number with a binary unit (k, M, G, T; "Mi", "MiB", "MB" all mean MiB).
_SIZE = re.compile(r"([0-9]{1,15})\s*(?:([kmgt])i?b?)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# Repository names (lower case, digits, separators) with fnmatch's wildcards; `*` also matches "/".
_REPOSITORY_PATTERN = re.compile(r"[a-z0-9._/*?\[\]-]{1,255}")
_SECONDS = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A bad setting. The message names the variable and says what is wrong."""


@dataclass(frozen=True)
class Registry:
    key: str  # the variable prefix, e.g. DOCKERHUB
    name: str  # what clients pull from, e.g. docker.io
    upstream: str  # base URL of the real registry, no trailing slash
    cache: str | None  # base URL of its registry:2 cache; None passes through to upstream
    username: str = ""
    password: str = field(default="", repr=False)
    egress_port: int | None = None  # the proxy's egress listener for its cache; None when uncached
    repositories: tuple[str, ...] = ()  # glob patterns of the repositories served; empty: all
    max_disk: int | None = None  # bytes its cache's storage may hold (K_MAX_DISK); None: no budget of its own
    storage: Path | None = None  # its cache's storage root (registry:2's filesystem); None: no data plane
    token_realms: tuple[str, ...] = ()  # hosts besides the upstream's own domain that may issue its tokens

    @property
    def backend(self) -> str:
        """Where client requests for this registry go."""
        return self.cache or self.upstream

    def serves(self, repository: str) -> bool:
        return not self.repositories or any(fnmatch.fnmatchcase(repository, p) for p in self.repositories)


@dataclass(frozen=True)
class DataPlane:
    """Where the data plane listens, and which blobs the proxy sends there."""

    host: str  # bind address; "" for all interfaces
    port: int
    url: str | None  # public base URL for its 307s; None: the client's host name on `port`
    min_size: int  # smaller blobs keep streaming through the proxy: a redirect costs a round trip
    workers: int


@dataclass(frozen=True)
class Config:
    domain: str
    port: int
    admin_host: str  # where /metrics, /ready and /live listen: never on the mirror's port
    admin_port: int
    web_max_flows: int  # flows mitmweb keeps (regcache up --web)
    data_dir: Path
    pull_log: Path
    pull_log_stdout: bool
    registries: tuple[Registry, ...]
    egress_host: str = "127.0.0.1"
    client_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # empty: any client
    htpasswd: Path | None = None  # client accounts; None: no credentials asked
    max_disk: int | None = None  # bytes all caches' storage may hold together (REGCACHE_MAX_DISK)
    min_free_disk: int = 1 << 30  # a cache's disk with less free space is not ready
    stop_grace: float = 30.0  # seconds `regcache up` lets pulls in flight finish after SIGTERM
    web_password: str = field(default="", repr=False)
    warnings: tuple[str, ...] = ()  # variables that look like a misspelt setting
    tag_ttl: float = 60.0  # seconds
    manifest_cache_bytes: int = 8 << 20
    upstream_timeout: float = 5.0  # seconds
    dataplane: DataPlane | None = None  # None: REGCACHE_DATAPLANE=false, every blob streams through the proxy
    spool_max_disk: int = 10 << 30  # bytes of spools at once (spool.py); past it, fetches go upstream each
    admin_token: str = field(default="", repr=False)  # the Bearer token /metrics and /ready ask for
    max_client_connections: int = 256  # per client address, on every listener
    head_timeout: float = 10.0  # seconds for a whole request head, from connect or the last answer

    def registry(self, name: str) -> Registry | None:
        return next((r for r in self.registries if r.name == name), None)

    def egress_registry(self, port: int) -> Registry | None:
        """The cached registry whose egress listener is on `port`."""
        return next((r for r in self.registries if r.egress_port == port), None)

    def egress_url(self, registry: Registry) -> str:
        """The base URL a cache on this machine uses as its upstream (registry:2's remoteurl)."""
        return local_url(self.egress_host, registry.egress_port)

    def admin_url(self, path: str) -> str:
        """The admin endpoint's URL as seen from this machine."""
        return local_url(self.admin_host, self.admin_port) + path


def load_config(environ: Mapping[str, str] | None = None, env_file: str | os.PathLike = ".env") -> Config:
    """Read settings from DEFAULTS, then `env_file` if it exists, then `environ`."""
    environ = os.environ if environ is None else environ
    values = dict(DEFAULTS)
    if Path(env_file).is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(environ)
    return parse_config(values)


def prepare_directory(var: str, path: Path) -> None:
    """Create a directory regcache keeps files in (REGCACHE_DATA_DIR, a cache's storage) if it is
    not there, and check that files can be written in it: an unusable one is then one line
    naming its setting rather than a failure deep in some part."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{var}: {str(path)!r} is a file, not a directory") from None
    except OSError as e:
        raise ConfigError(f"{var}: cannot create {str(path)!r}: {e.strerror}") from None
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ConfigError(f"{var}: cannot write in {str(path)!r}: {e.strerror}") from None


def parse_config(values: Mapping[str, str]) -> Config:
    get = lambda name: values.get(name, "").strip()  # noqa: E731
    data_dir = Path(get("REGCACHE_DATA_DIR") or "./data").absolute()
    keys = _registry_keys(get("REGCACHE_REGISTRIES"))
    egress_base = _port("REGCACHE_EGRESS_PORT", get("REGCACHE_EGRESS_PORT"))
    registries = tuple(_registry(key, get, egress_base + index, data_dir) for index, key in enumerate(keys))
    _check_names_differ(registries)
    port = _port("REGCACHE_PORT", get("REGCACHE_PORT"))
    admin_port = _port("REGCACHE_ADMIN_PORT", get("REGCACHE_ADMIN_PORT"))
    dataplane = _dataplane(get) if _bool("REGCACHE_DATAPLANE", get("REGCACHE_DATAPLANE")) else None
    _check_ports_differ(port, admin_port, dataplane, registries, get)
    admin_host = _ip_address("REGCACHE_ADMIN_HOST", get("REGCACHE_ADMIN_HOST"))
    if not is_loopback_host(admin_host) and not get("REGCACHE_ADMIN_TOKEN"):
        raise ConfigError(f"REGCACHE_ADMIN_TOKEN: not set, but REGCACHE_ADMIN_HOST ({admin_host}) is not loopback;"
                          " set a token (e.g. `openssl rand -hex 32`) that /metrics and /ready will ask for")
    return Config(
        domain=_hostname("REGISTRY_DOMAIN", get("REGISTRY_DOMAIN").lower()),
        port=port,
        admin_host=admin_host,
        admin_port=admin_port,
        web_max_flows=_positive("REGCACHE_WEB_MAX_FLOWS", get("REGCACHE_WEB_MAX_FLOWS")),
        data_dir=data_dir,
        pull_log=Path(get("REGCACHE_PULL_LOG")).absolute() if get("REGCACHE_PULL_LOG") else data_dir / "pull.log",
        pull_log_stdout=_bool("REGCACHE_PULL_LOG_STDOUT", get("REGCACHE_PULL_LOG_STDOUT")),
        registries=registries,
        egress_host=_ip_address("REGCACHE_EGRESS_HOST", get("REGCACHE_EGRESS_HOST")),
        client_networks=_networks("REGCACHE_CLIENTS", get("REGCACHE_CLIENTS")),
        htpasswd=_readable_file("REGCACHE_HTPASSWD", get("REGCACHE_HTPASSWD")),
        max_disk=_optional_size("REGCACHE_MAX_DISK", get("REGCACHE_MAX_DISK")),
        min_free_disk=parse_size("REGCACHE_MIN_FREE_DISK", get("REGCACHE_MIN_FREE_DISK") or "0"),
        stop_grace=_positive("REGCACHE_STOP_GRACE", get("REGCACHE_STOP_GRACE")),
        web_password=values.get("REGCACHE_WEB_PASSWORD", ""),
        warnings=tuple(misspelt_settings(values, keys)),
        tag_ttl=_seconds("REGCACHE_TAG_TTL", get("REGCACHE_TAG_TTL")),
        manifest_cache_bytes=parse_size("REGCACHE_MANIFEST_CACHE", get("REGCACHE_MANIFEST_CACHE")),
        upstream_timeout=_seconds("REGCACHE_UPSTREAM_TIMEOUT", get("REGCACHE_UPSTREAM_TIMEOUT")),
        spool_max_disk=parse_size("REGCACHE_SPOOL_MAX_DISK", get("REGCACHE_SPOOL_MAX_DISK")),
        dataplane=dataplane,
        admin_token=get("REGCACHE_ADMIN_TOKEN"),
        max_client_connections=_positive("REGCACHE_MAX_CONNECTIONS_PER_CLIENT", get("REGCACHE_MAX_CONNECTIONS_PER_CLIENT")),
        head_timeout=_positive("REGCACHE_HEAD_TIMEOUT", get("REGCACHE_HEAD_TIMEOUT")),
    )


def _dataplane(get) -> DataPlane:
    host = get("REGCACHE_DATAPLANE_HOST")
    workers = get("REGCACHE_DATAPLANE_WORKERS")
    return DataPlane(
        host=_ip_address("REGCACHE_DATAPLANE_HOST", host) if host else "",
        port=_port("REGCACHE_DATAPLANE_PORT", get("REGCACHE_DATAPLANE_PORT")),
        url=base_url("REGCACHE_DATAPLANE_URL", get("REGCACHE_DATAPLANE_URL")) if get("REGCACHE_DATAPLANE_URL") else None,
        min_size=parse_size("REGCACHE_DATAPLANE_MIN_SIZE", get("REGCACHE_DATAPLANE_MIN_SIZE")),
        workers=_positive("REGCACHE_DATAPLANE_WORKERS", workers) if workers else os.cpu_count() or 1,
    )


def misspelt_settings(names, keys: list[str]) -> list[str]:
    """One warning per name that is not a setting but nearly is one (DOCKERHUB_UPSTRAEM): such
    a name is otherwise silently ignored."""
    known = {*DEFAULTS, *(f"{key}_{setting}" for key in keys for setting in REGISTRY_SETTINGS)}
    warnings = []
    for name in sorted(set(names) - known):
        if close := difflib.get_close_matches(name, known, n=1, cutoff=0.85):
            warnings.append(f"{name} is not a regcache setting; did you mean {close[0]}?")
    return warnings


def _registry_keys(value: str) -> list[str]:
    keys = [k.strip() for k in value.split(",") if k.strip()]
    if not keys:
        raise ConfigError("REGCACHE_REGISTRIES: empty; list registry keys such as DOCKERHUB,GHCR")
    for key in keys:
        if not _KEY.fullmatch(key):
            raise ConfigError(f"REGCACHE_REGISTRIES: {key!r} is not a key (capital letters, digits, _)")
    if duplicates := sorted({k for k in keys if keys.count(k) > 1}):
        raise ConfigError(f"REGCACHE_REGISTRIES: {duplicates[0]!r} is listed twice")
    return keys


def _registry(key: str, get, default_egress_port: int, data_dir: Path) -> Registry:
    name_var, upstream_var, cache_var = f"{key}_REGISTRY", f"{key}_UPSTREAM", f"{key}_CACHE"
    for var in (name_var, upstream_var, cache_var):
        if not get(var):
            raise ConfigError(f"{var}: not set, and {key} is listed in REGCACHE_REGISTRIES")
    name = get(name_var).lower()
    if not _REGISTRY_NAME.fullmatch(name):
        raise ConfigError(f"{name_var}: {name!r} is not a registry host name such as docker.io")
    cache = None if get(cache_var).lower() == "none" else base_url(cache_var, get(cache_var))
    if cache and cache.startswith("https:") and is_local(cache):
        raise ConfigError(f"{cache_var}: {cache!r} is on this machine, so `regcache up` runs it, without TLS: use http://")
    username, password = get(f"{key}_USERNAME"), get(f"{key}_PASSWORD")
    if bool(username) != bool(password):
        missing, given = (f"{key}_PASSWORD", f"{key}_USERNAME") if username else (f"{key}_USERNAME", f"{key}_PASSWORD")
        raise ConfigError(f"{missing}: not set, but {given} is; set both or neither")
    egress_var = f"{key}_EGRESS_PORT"
    egress_port = _port(egress_var, get(egress_var)) if get(egress_var) else default_egress_port
    return Registry(
        key, name, base_url(upstream_var, get(upstream_var)), cache, username, password, egress_port if cache else None,
        repositories=_repository_patterns(f"{key}_REPOSITORIES", get(f"{key}_REPOSITORIES")),
        max_disk=_optional_size(f"{key}_MAX_DISK", get(f"{key}_MAX_DISK")) if cache else None,
        storage=_storage(key, get, cache, data_dir),
        token_realms=_host_names(f"{key}_TOKEN_REALMS", get(f"{key}_TOKEN_REALMS")),
    )


def _host_names(var: str, value: str) -> tuple[str, ...]:
    names = tuple(n.strip().rstrip(".").lower() for n in value.split(",") if n.strip())
    for name in names:
        if not (_REGISTRY_NAME.fullmatch(name) and ":" not in name) and parse_ip(name) is None:
            raise ConfigError(f"{var}: {name!r} is not a host name such as auth.example.com")
    return names


def _repository_patterns(var: str, value: str) -> tuple[str, ...]:
    patterns = tuple(p.strip() for p in value.split(",") if p.strip())
    for pattern in patterns:
        if not _REPOSITORY_PATTERN.fullmatch(pattern):
            raise ConfigError(f"{var}: {pattern!r} is not a repository pattern such as library/* or myteam/app-?")
    return patterns


def _networks(var: str, value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{var}: {item!r} is not a network such as 10.0.0.0/8, 192.168.1.7 or fd00::/8") from None
    return tuple(networks)


def _readable_file(var: str, value: str) -> Path | None:
    if not value:
        return None
    path = Path(value).absolute()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"{var}: {value!r} is not a file regcache can read")
    return path


def _storage(key: str, get, cache: str | None, data_dir: Path) -> Path | None:
    """The cache's storage root: K_STORAGE, else where `regcache up` keeps a cache it runs."""
    var = f"{key}_STORAGE"
    if get(var):
        if cache is None:
            raise ConfigError(f"{var}: set, but {key}_CACHE is none: a registry passed through has no storage")
        return Path(get(var)).absolute()
    return data_dir / key.lower() / "storage" if cache and is_local(cache) else None


def base_url(var: str, value: str) -> str:
    """A checked bare http(s)://host[:port] URL, lower-cased; `var` names the setting in errors."""
    if "@" in value:
        # Checked before parsing, and the value is never echoed: it may hold user:password@.
        raise ConfigError(f"{var}: has '@' in it; credentials go in the _USERNAME/_PASSWORD variables, not in a URL")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{var}: {value!r} is not a URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{var}: {value!r} is not an http:// or https:// URL with a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{var}: {value!r} must be a bare scheme://host[:port], with no path")
    if port == 0:
        raise ConfigError(f"{var}: {value!r} has port 0")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _hostname(var: str, value: str) -> str:
    if not _HOSTNAME.fullmatch(value):
        raise ConfigError(f"{var}: {value!r} is not a DNS name such as registry.example.com")
    return value


def _port(var: str, value: str) -> int:
    if not _NUMBER.fullmatch(value) or not 0 < int(value) < 65536:
        raise ConfigError(f"{var}: {value!r} is not a port number (1-65535)")
    return int(value)


def _positive(var: str, value: str) -> int:
    if not _NUMBER.fullmatch(value) or int(value) < 1:
        raise ConfigError(f"{var}: {value!r} is not a whole number of at least 1")
    return int(value)


def _seconds(var: str, value: str) -> float:
    if not _SECONDS.fullmatch(value) or float(value) <= 0:
        raise ConfigError(f"{var}: {value!r} is not a number of seconds above 0, such as 60 or 2.5")
    return float(value)


def parse_size(var: str, value: str) -> int:
    """`50G`, `512M`, `4k` or plain bytes -> bytes (units are binary: 1k = 1024)."""
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise ConfigError(f"{var}: {value!r} is not a size such as 512M, 50G or a number of bytes")
    return int(match[1]) * _SIZE_UNITS[(match[2] or "").lower()]


def _optional_size(var: str, value: str) -> int | None:
    """A size of at least 1 byte, or None when the value is empty."""
    if not value:
        return None
    size = parse_size(var, value)
    if size < 1:
        raise ConfigError(f"{var}: {value!r} is no room at all; leave it empty for no budget")
    return size


def _ip_address(var: str, value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{var}: {value!r} is not an IP address to listen on, such as 127.0.0.1 or 0.0.0.0") from None


def _bool(var: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{var}: {value!r} is not true or false")


def _check_ports_differ(port: int, admin_port: int, dataplane: DataPlane | None, registries: tuple[Registry, ...],
                        get) -> None:
    """Every listener needs a port of its own. Errors name the variable that gave the port."""
    if admin_port == port:
        raise ConfigError(f"REGCACHE_ADMIN_PORT: {admin_port} is taken by REGCACHE_PORT; the admin endpoint needs its own")
    taken = {port: "REGCACHE_PORT", admin_port: "REGCACHE_ADMIN_PORT"}
    if dataplane is not None:
        if dataplane.port in taken:
            raise ConfigError(f"REGCACHE_DATAPLANE_PORT: {dataplane.port} is taken by {taken[dataplane.port]}; "
                              "the data plane needs its own")
        taken[dataplane.port] = "REGCACHE_DATAPLANE_PORT"
    for r in registries:
        if r.egress_port is None:
            continue
        own = f"{r.key}_EGRESS_PORT"
        var = own if get(own) else "REGCACHE_EGRESS_PORT"
        if r.egress_port > 65535:
            raise ConfigError(f"{var}: gives {r.key} egress port {r.egress_port}, past 65535")
        if r.egress_port in taken:
            raise ConfigError(f"{var}: gives {r.key} egress port {r.egress_port}, which {taken[r.egress_port]} uses too")
        taken[r.egress_port] = own


def _check_names_differ(registries: tuple[Registry, ...]) -> None:
    """Routing finds a registry by name, so two with one name would make one unreachable."""
    key_of: dict[str, str] = {}
    for r in registries:
        if r.name in key_of:
            raise ConfigError(f"{r.key}_REGISTRY: {r.name!r} is also {key_of[r.name]}_REGISTRY; each registry needs its own name")
        key_of[r.name] = r.key


def local_url(address: str, port: int) -> str:
    """How this machine reaches a listener bound to `address`: a wildcard address means loopback."""
    parsed = ipaddress.ip_address(address)
    if parsed.is_unspecified:
        parsed = ipaddress.ip_address("::1" if parsed.version == 6 else "127.0.0.1")
    host = f"[{parsed}]" if parsed.version == 6 else str(parsed)
    return f"http://{host}:{port}"


def is_local(url: str) -> bool:
    """True when the URL's host is this machine's loopback, so `regcache up` runs it."""
    return is_loopback_host(urlsplit(url).hostname or "")


def is_loopback_host(host: str) -> bool:
    """`localhost`, or a loopback address in any spelling (IPv4-mapped IPv6 too)."""
    return host == "localhost" or ((address := parse_ip(host)) is not None and address.is_loopback)


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`text` as an IP address in one form per address (IPv4-mapped IPv6 such as ::ffff:10.0.0.5
    as IPv4, scope ids dropped); None when it is no IP address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address
