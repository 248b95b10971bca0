"""Settings: the environment and `.env`, checked and turned into typed values.

Every setting is declared once, at the end of this module (SECTIONS, REGISTRY_SETTINGS): its
name, default, parser and help. `.env.example` and the table in docs/configuration.md are
written from those declarations by `regcache config-docs`. The real environment wins over
`.env`, and both win over `DEFAULTS`. A registry is a few variables sharing a prefix (its key):

    REGCACHE_REGISTRIES=DOCKERHUB,K8S
    K8S_REGISTRY=registry.k8s.io          # the name clients pull from
    K8S_UPSTREAM=https://registry.k8s.io  # where its images come from
    K8S_CACHE=http://127.0.0.1:5004       # its registry:2 cache, or "none" to pass through
    K8S_USERNAME= / K8S_PASSWORD=         # optional upstream credentials
    K8S_MAX_DISK=20G                      # optional: its cache's own disk budget
    K8S_STORAGE=/caches/k8s               # optional: its cache's storage, as this machine sees it,
                                          # or s3://BUCKET/PREFIX: an S3-compatible object store

Caches never talk to an upstream themselves: each cached registry's cache uses an egress
listener of the proxy as its upstream, bound to REGCACHE_EGRESS_HOST, on port K_EGRESS_PORT if
set, else REGCACHE_EGRESS_PORT + the registry's position in REGCACHE_REGISTRIES (0-based). The
proxy adds credentials there.

The data plane (REGCACHE_DATAPLANE_*) sends warm blobs straight from a cache's storage: the
proxy answers a warm blob GET with a 307 to it. It needs the storage root of each cache
(K_STORAGE); for the caches `regcache up` runs that is where it puts them, by default
<data dir>/<key lower>/storage (replicas point it at one shared volume).
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

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
MIN_REQUEST_HEAD = 8 << 10  # bytes: a pull's request line and headers with a bearer token (JWTs run to a few kB)
_SECONDS = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A bad setting. The message names the variable and says what is wrong."""


@dataclass(frozen=True)
class Setting:
    """One variable, declared once: `.env.example` and the table in docs/configuration.md are
    written from these (`regcache config-docs`), and parse_config reads each with its `parse`."""

    name: str  # the variable; for a registry's own settings, what follows `<KEY>_`
    default: str  # as written in .env; "" when unset
    parse: Callable[[str, str], Any]  # (variable, value) -> typed value; a bad value raises ConfigError naming it
    help: str  # what it is, one line: the docs table's meaning
    notes: str = ""  # more for `.env.example`'s comment
    empty_means: str = ""  # what leaving it empty does, when that needs saying
    required: bool = False  # a registry's own setting it cannot go without
    strip: bool = True  # False for a password: spaces may be part of it


@dataclass(frozen=True)
class ObjectStore:
    """Where a cache keeps its blobs in an S3-compatible object store: K_STORAGE=s3://BUCKET/PREFIX."""

    bucket: str
    prefix: str  # registry:2's rootdirectory, without slashes at either end; "" for the bucket's root

    def key(self, path: str) -> str:
        """The object key of `path` (relative to the storage root, as registry:2 lays it out)."""
        return f"{self.prefix}/{path}" if self.prefix else path

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class S3Access:
    """How regcache and its caches reach the object store: the AWS SDK's own variables."""

    endpoint: str | None  # AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; None: AWS S3 itself
    region: str
    access_key: str = field(repr=False)  # "": the SDK's own chain (instance role, ~/.aws)
    secret_key: str = field(repr=False)
    redirect: bool = False  # REGCACHE_S3_REDIRECT: warm blobs by presigned URLs of the store
    session_token: str = field(default="", repr=False)  # AWS_SESSION_TOKEN: temporary credentials (STS)
    copies_max_disk: int = 0  # REGCACHE_S3_COPIES_MAX_DISK: bytes of the data plane's local copies; 0: none
    read_parts: int = 1  # REGCACHE_S3_READ_PARTS: ranged GETs at once of a copy's first read (objectstore/parts.py)
    read_part_size: int = 8 << 20  # REGCACHE_S3_READ_PART_SIZE: bytes of each

    def describe(self) -> str:
        """Where the store is, for messages (never the credentials)."""
        return self.endpoint or f"AWS S3 ({self.region})"


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
    storage: Path | None = None  # its cache's storage root (registry:2's filesystem); None: none on a filesystem
    object_store: ObjectStore | None = None  # K_STORAGE=s3://...: its cache keeps blobs there instead
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
class Cluster:
    """Several replicas as one cache: the Redis they share, and the key their peer requests carry."""

    redis_url: str = field(repr=False)  # may hold a password: never logged (see cluster/link.py's describe_url)
    redis_timeout: float  # seconds, every Redis call
    secret: bytes = field(repr=False)  # signs what one replica sends another


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
    egress_host: str
    client_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # empty: any client
    htpasswd: Path | None  # client accounts; None: no credentials asked
    max_disk: int | None  # bytes all caches' storage may hold together (REGCACHE_MAX_DISK)
    min_free_disk: int  # a cache's disk with less free space is not ready
    stop_grace: float  # seconds `regcache up` lets pulls in flight finish after SIGTERM
    web_password: str = field(repr=False)
    warnings: tuple[str, ...]  # variables that look like a misspelt setting
    tag_ttl: float  # seconds
    manifest_cache_bytes: int
    upstream_timeout: float  # seconds
    dataplane: DataPlane | None  # None: REGCACHE_DATAPLANE=false, every blob streams through the proxy
    spool_max_disk: int  # bytes of spools at once; past it, fetches go upstream each
    admin_token: str = field(repr=False)  # the Bearer token /metrics and /ready ask for
    max_client_connections: int  # per client address, on every listener
    head_timeout: float  # seconds for a whole request head, from connect or the last answer
    max_request_head: int  # bytes of one request head, request line and blank line included
    cluster: Cluster | None  # None: one node, its state in this process
    s3: S3Access  # for the caches whose K_STORAGE is s3://

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
    read = lambda name: _read(values, SETTING[name], name)  # noqa: E731
    get = lambda name: values.get(name, "").strip()  # noqa: E731
    data_dir = read("REGCACHE_DATA_DIR")
    keys = read("REGCACHE_REGISTRIES")
    egress_base = read("REGCACHE_EGRESS_PORT")
    registries = tuple(_registry(key, values, egress_base + index, data_dir) for index, key in enumerate(keys))
    _check_names_differ(registries)
    port = read("REGCACHE_PORT")
    admin_port = read("REGCACHE_ADMIN_PORT")
    dataplane = _dataplane(read) if read("REGCACHE_DATAPLANE") else None
    _check_ports_differ(port, admin_port, dataplane, registries, get)
    cluster = _cluster(read)
    if cluster is not None and dataplane is not None and dataplane.url is None:
        # Other replicas send a cold blob's requests to the spool of the replica downloading it.
        raise ConfigError("REGCACHE_DATAPLANE_URL: not set, but REGCACHE_REDIS_URL is; give each replica the URL "
                          "where clients and the other replicas reach its own data plane (e.g. http://POD-IP:5050)")
    admin_host = read("REGCACHE_ADMIN_HOST")
    if not is_loopback_host(admin_host) and not read("REGCACHE_ADMIN_TOKEN"):
        raise ConfigError(f"REGCACHE_ADMIN_TOKEN: not set, but REGCACHE_ADMIN_HOST ({admin_host}) is not loopback;"
                          " set a token (e.g. `openssl rand -hex 32`) that /metrics and /ready will ask for")
    if read("AWS_SESSION_TOKEN") and not (read("AWS_ACCESS_KEY_ID") and read("AWS_SECRET_ACCESS_KEY")):
        raise ConfigError("AWS_SESSION_TOKEN: set without AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; a session "
                          "token comes with the temporary keys it belongs to")
    return Config(
        domain=read("REGISTRY_DOMAIN"),
        port=port,
        admin_host=admin_host,
        admin_port=admin_port,
        web_max_flows=read("REGCACHE_WEB_MAX_FLOWS"),
        data_dir=data_dir,
        pull_log=read("REGCACHE_PULL_LOG") or data_dir / "pull.log",
        pull_log_stdout=read("REGCACHE_PULL_LOG_STDOUT"),
        registries=registries,
        egress_host=read("REGCACHE_EGRESS_HOST"),
        client_networks=read("REGCACHE_CLIENTS"),
        htpasswd=read("REGCACHE_HTPASSWD"),
        max_disk=read("REGCACHE_MAX_DISK"),
        min_free_disk=read("REGCACHE_MIN_FREE_DISK"),
        stop_grace=read("REGCACHE_STOP_GRACE"),
        web_password=read("REGCACHE_WEB_PASSWORD"),
        warnings=tuple(misspelt_settings(values, keys)),
        tag_ttl=read("REGCACHE_TAG_TTL"),
        manifest_cache_bytes=read("REGCACHE_MANIFEST_CACHE"),
        upstream_timeout=read("REGCACHE_UPSTREAM_TIMEOUT"),
        spool_max_disk=read("REGCACHE_SPOOL_MAX_DISK"),
        dataplane=dataplane,
        admin_token=read("REGCACHE_ADMIN_TOKEN"),
        max_client_connections=read("REGCACHE_MAX_CONNECTIONS_PER_CLIENT"),
        head_timeout=read("REGCACHE_HEAD_TIMEOUT"),
        max_request_head=read("REGCACHE_MAX_REQUEST_HEAD"),
        cluster=cluster,
        s3=S3Access(read("AWS_ENDPOINT_URL_S3") or read("AWS_ENDPOINT_URL"), read("AWS_REGION") or "us-east-1",
                    read("AWS_ACCESS_KEY_ID"), read("AWS_SECRET_ACCESS_KEY"), read("REGCACHE_S3_REDIRECT"),
                    read("AWS_SESSION_TOKEN"), read("REGCACHE_S3_COPIES_MAX_DISK"), read("REGCACHE_S3_READ_PARTS"),
                    read("REGCACHE_S3_READ_PART_SIZE")),
    )


def _read(values: Mapping[str, str], setting: Setting, name: str):
    """The value of `name` (a setting, or a registry's own one), parsed as `setting` declares."""
    value = values.get(name, "")
    return setting.parse(name, value.strip() if setting.strip else value)


def _dataplane(read) -> DataPlane:
    return DataPlane(
        host=read("REGCACHE_DATAPLANE_HOST"),
        port=read("REGCACHE_DATAPLANE_PORT"),
        url=read("REGCACHE_DATAPLANE_URL"),
        min_size=read("REGCACHE_DATAPLANE_MIN_SIZE"),
        workers=read("REGCACHE_DATAPLANE_WORKERS"),
    )


def _cluster(read) -> Cluster | None:
    redis_url, secret = read("REGCACHE_REDIS_URL"), read("REGCACHE_CLUSTER_SECRET")
    if redis_url is None:
        if secret:
            raise ConfigError("REGCACHE_CLUSTER_SECRET: set, but REGCACHE_REDIS_URL is not; replicas need both")
        return None
    if len(secret) < 16:
        raise ConfigError("REGCACHE_CLUSTER_SECRET: " + ("not set" if not secret else "shorter than 16 characters")
                          + ", but REGCACHE_REDIS_URL is; give every replica one long random secret "
                          "(e.g. `openssl rand -hex 32`)")
    return Cluster(redis_url, read("REGCACHE_REDIS_TIMEOUT"), secret.encode())


def _redis_url(var: str, value: str) -> str | None:
    """redis://[[user]:password@]host[:port][/db] or rediss:// (TLS); None when empty."""
    if not value:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"{var}: not a redis:// or rediss:// URL with a host, such as redis://redis:6379/0")
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ConfigError(f"{var}: the path names a database by number (/0), not {parts.path!r}")
    return value


def misspelt_settings(names, keys: list[str]) -> list[str]:
    """One warning per name that is not a setting but nearly is one (DOCKERHUB_UPSTRAEM): such
    a name is otherwise silently ignored."""
    known = {*DEFAULTS, *(f"{key}_{setting.name}" for key in keys for setting in REGISTRY_SETTINGS)}
    warnings = []
    for name in sorted(set(names) - known):
        if close := difflib.get_close_matches(name, known, n=1, cutoff=0.85):
            warnings.append(f"{name} is not a regcache setting; did you mean {close[0]}?")
    return warnings


def _registry_keys(var: str, value: str) -> list[str]:
    keys = [k.strip() for k in value.split(",") if k.strip()]
    if not keys:
        raise ConfigError(f"{var}: empty; list registry keys such as DOCKERHUB,GHCR")
    for key in keys:
        if not _KEY.fullmatch(key):
            raise ConfigError(f"{var}: {key!r} is not a key (capital letters, digits, _)")
    if duplicates := sorted({k for k in keys if keys.count(k) > 1}):
        raise ConfigError(f"{var}: {duplicates[0]!r} is listed twice")
    return keys


def _registry(key: str, values: Mapping[str, str], default_egress_port: int, data_dir: Path) -> Registry:
    own = lambda name: _read(values, REGISTRY_SETTING[name], f"{key}_{name}")  # noqa: E731
    for setting in REGISTRY_SETTINGS:
        if setting.required and not values.get(f"{key}_{setting.name}", "").strip():
            raise ConfigError(f"{key}_{setting.name}: not set, and {key} is listed in REGCACHE_REGISTRIES")
    name = own("REGISTRY")
    cache = own("CACHE")
    username, password = own("USERNAME"), own("PASSWORD")
    if bool(username) != bool(password):
        missing, given = (f"{key}_PASSWORD", f"{key}_USERNAME") if username else (f"{key}_USERNAME", f"{key}_PASSWORD")
        raise ConfigError(f"{missing}: not set, but {given} is; set both or neither")
    egress_port = own("EGRESS_PORT") or default_egress_port
    return Registry(
        key, name, own("UPSTREAM"), cache, username, password, egress_port if cache else None,
        repositories=own("REPOSITORIES"),
        max_disk=own("MAX_DISK") if cache else None,
        **_storage(key, own("STORAGE"), cache, data_dir),
        token_realms=own("TOKEN_REALMS"),
    )


def _storage(key: str, storage: Path | ObjectStore | None, cache: str | None, data_dir: Path) -> dict:
    """The Registry's `storage` or `object_store`: K_STORAGE, else where `regcache up` keeps a
    cache it runs."""
    if storage:
        if cache is None:
            raise ConfigError(f"{key}_STORAGE: set, but {key}_CACHE is none: a registry passed through has no storage")
        if isinstance(storage, ObjectStore):
            if not is_local(cache):
                raise ConfigError(f"{key}_STORAGE: s3:// is for a cache `regcache up` runs; {key}_CACHE is elsewhere")
            return {"object_store": storage}
        return {"storage": storage}
    return {"storage": data_dir / key.lower() / "storage" if cache and is_local(cache) else None}


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_KEY_PREFIX = re.compile(r"[A-Za-z0-9!_.*'()/-]{0,512}")


def _storage_location(var: str, value: str) -> Path | ObjectStore | None:
    """A directory, or s3://BUCKET/PREFIX; None when empty."""
    if not value.lower().startswith("s3://"):
        return _optional_path(var, value)
    bucket, _, prefix = value[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"{var}: {bucket!r} is not an S3 bucket name (3-63 characters: a-z, 0-9, '.', '-')")
    if not _KEY_PREFIX.fullmatch(prefix) or "//" in prefix:
        raise ConfigError(f"{var}: {prefix!r} is not a key prefix such as regcache/dockerhub (letters, digits, "
                          "/ and !_.*'()- only)")
    return ObjectStore(bucket, prefix)


def _region(var: str, value: str) -> str:
    if value and not re.fullmatch(r"[a-z0-9-]{1,64}", value):
        raise ConfigError(f"{var}: {value!r} is not a region name such as us-east-1")
    return value


def _domain(var: str, value: str) -> str:
    return _hostname(var, value.lower())


def _registry_name(var: str, value: str) -> str:
    name = value.lower()
    if not _REGISTRY_NAME.fullmatch(name):
        raise ConfigError(f"{var}: {name!r} is not a registry host name such as docker.io")
    return name


def _cache_url(var: str, value: str) -> str | None:
    """A registry:2 cache's base URL, or None for `none`: requests pass through to the upstream."""
    if value.lower() == "none":
        return None
    cache = base_url(var, value)
    if cache.startswith("https:") and is_local(cache):
        raise ConfigError(f"{var}: {cache!r} is on this machine, so `regcache up` runs it, without TLS: use http://")
    return cache


def _text(var: str, value: str) -> str:
    return value


def _data_dir(var: str, value: str) -> Path:
    return Path(value or "./data").absolute()


def _optional_path(var: str, value: str) -> Path | None:
    return Path(value).absolute() if value else None


def _optional_port(var: str, value: str) -> int | None:
    return _port(var, value) if value else None


def _optional_url(var: str, value: str) -> str | None:
    return base_url(var, value) if value else None


def _bind_address(var: str, value: str) -> str:
    """An address to listen on; "" (empty) for all interfaces."""
    return _ip_address(var, value) if value else ""


def _workers(var: str, value: str) -> int:
    return _positive(var, value) if value else os.cpu_count() or 1


def _size_or_zero(var: str, value: str) -> int:
    return parse_size(var, value or "0")


def _part_size(var: str, value: str) -> int:
    size = parse_size(var, value)
    if size < 1 << 20:
        raise ConfigError(f"{var}: {value!r} is below 1M: parts that small cost more GETs than they gain")
    return size


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


def _head_size(var: str, value: str) -> int:
    size = parse_size(var, value)
    if size < MIN_REQUEST_HEAD:
        raise ConfigError(f"{var}: {value!r} is too small for a pull's request head: give at least {MIN_REQUEST_HEAD // 1024}k")
    return size


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


# The settings, each declared once. Grouped as `.env.example` and docs/configuration.md show
# them: (section title, what the section is about, its settings).
SECTIONS: tuple[tuple[str, str, tuple[Setting, ...]], ...] = (
    ("The proxy", "", (
        Setting("REGISTRY_DOMAIN", "registry.localhost", _domain,
                "clients reach registry R at `R.<REGISTRY_DOMAIN>`",
                "For example http://docker.io.registry.example.com:5000. Make *.<REGISTRY_DOMAIN> resolve to "
                "this host (see DNS in docs/clients.md), or use one http://<host>:5000 endpoint with containerd (?ns=)."),
        Setting("REGCACHE_PORT", "5000", _port, "the port clients use", "The proxy listens on it on all interfaces."),
        Setting("REGCACHE_DATA_DIR", "./data", _data_dir,
                "caches' storage and configs, the pull log and other state",
                "Created if missing; regcache stops at start, naming this variable, if it cannot write there."),
        Setting("REGCACHE_PULL_LOG", "", _optional_path, "where the pull log goes: one JSON line per request",
                empty_means="`<data dir>/pull.log`"),
        Setting("REGCACHE_PULL_LOG_STDOUT", "false", _bool, "also print pull log lines on stdout (true/false)"),
    )),
    ("Data plane: warm layers by sendfile",
     "The proxy answers a GET of a layer its cache holds (and that repository may serve) with a 307 to the "
     "data plane: worker processes sending the file straight from the cache's storage by sendfile, several "
     "times faster than through the proxy. The URL is signed for that one blob and expires in 5 minutes. "
     "Clients must reach its port as they reach REGCACHE_PORT.", (
        Setting("REGCACHE_DATAPLANE", "true", _bool,
                "warm layers by the data plane; `false`: every layer streams through the proxy (one process, one core)"),
        Setting("REGCACHE_DATAPLANE_HOST", "", _bind_address, "where the data plane listens",
                empty_means="all interfaces, like the client listener"),
        Setting("REGCACHE_DATAPLANE_PORT", "5050", _port, "the data plane's port",
                "The 307 names the host the client used (virtual host or ?ns= endpoint) with this port."),
        Setting("REGCACHE_DATAPLANE_URL", "", _optional_url,
                "public base URL for its 307s (`http://host:port`, no path), where clients reach the data plane "
                "elsewhere: NAT, a port-forward, a Kubernetes Service",
                "Required with replicas (REGCACHE_REDIS_URL), one per replica: the other replicas send a cold "
                "blob's requests to the data plane of the replica downloading it.",
                empty_means="the host name the client used, on `REGCACHE_DATAPLANE_PORT`"),
        Setting("REGCACHE_DATAPLANE_MIN_SIZE", "256k", parse_size,
                "smaller warm blobs are answered by the proxy from the cache's storage (the 307 costs the client "
                "a round trip)",
                "Measured on loopback, the redirect wins from 64 KiB up (docs/benchmarks.md); 256k leaves room for "
                "a client's network round trip. Raise it for clients far away (WAN). Sizes like 256k, 1M."),
        Setting("REGCACHE_DATAPLANE_WORKERS", "", _workers, "data-plane worker processes, all on the one port",
                empty_means="one per core"),
    )),
    ("Egress: how caches reach their upstreams",
     "A cache never talks to its upstream itself: its upstream is an egress listener of the proxy, which adds "
     "the K_USERNAME/K_PASSWORD credentials (Basic, or a Bearer token it fetches and keeps in "
     "<REGCACHE_DATA_DIR>/upstream-tokens, mode 0600) and forwards over HTTPS.", (
        Setting("REGCACHE_EGRESS_HOST", "127.0.0.1", _ip_address,
                "where the egress listeners listen (`0.0.0.0` in a container)",
                "Loopback when `regcache up` runs the caches; 0.0.0.0 in a container whose caches are other "
                "containers (never publish these ports). Only a registry's own cache may use its listener (others "
                "get 403); with a cache on loopback, every loopback address (127.0.0.0/8, ::1) counts as the "
                "cache, so :: or ::1 work here too."),
        Setting("REGCACHE_EGRESS_PORT", "5080", _port,
                "first egress port; the registry at position N of `REGCACHE_REGISTRIES` (from 0) gets this + N, "
                "unless it has a `K_EGRESS_PORT`"),
        Setting("REGCACHE_SPOOL_MAX_DISK", "10G", parse_size,
                "disk for spools of cold blobs being fetched (see docs/how-it-works.md); past it, concurrent "
                "fetches go upstream each",
                "Concurrent GETs of one cold blob make one upstream fetch: the first starts the proxy's own "
                "download to <REGCACHE_DATA_DIR>/spools/; clients and the cache are all sent to the data plane, "
                "which sends the file while it grows, and the cache stores the blob from it (needs "
                "REGCACHE_DATAPLANE on; off, cold layers stream through the proxy); a client leaving cuts nobody "
                "else. Sizes like 512M, 50G."),
    )),
    ("Tags, manifests and upstream outages", "", (
        Setting("REGCACHE_TAG_TTL", "60", _seconds, "seconds a tag's digest is served without asking upstream",
                "A cluster rollout pulls one tag from hundreds of nodes within a minute: 60 makes that one "
                "upstream request, and a tag pushed anew is seen within a minute. Then one HEAD revalidates it "
                "(Docker Hub does not count HEADs). Tags are kept in <REGCACHE_DATA_DIR>/tags, so they survive "
                "a restart."),
        Setting("REGCACHE_MANIFEST_CACHE", "8M", parse_size,
                "manifest bodies kept in memory, by digest (`512k`, `8M`, ...; least recently used go first)"),
        Setting("REGCACHE_UPSTREAM_TIMEOUT", "5", _seconds,
                "seconds an upstream has to start answering, name lookup and connect included",
                "For every exchange: a stale tag's HEAD, a cache's fetch, an uncached registry's request. An "
                "upstream that misses it is marked down: cached content is served as it is, the rest gets 503 "
                "UNAVAILABLE at once, and a probe asks it again every 5 s."),
    )),
    ("Registries", "", (
        Setting("REGCACHE_REGISTRIES", "DOCKERHUB,GHCR,QUAY", _registry_keys,
                "the keys of the registries served; registry K has the `K_` settings below"),
    )),
    ("Who may use regcache",
     "regcache pulls with the upstream credentials: whoever reaches REGCACHE_PORT reads what they can.", (
        Setting("REGCACHE_CLIENTS", "", _networks,
                "networks allowed to use regcache (comma-separated CIDRs or addresses, IPv4 and IPv6); others "
                "get 403 DENIED and reach nothing", empty_means="any address"),
        Setting("REGCACHE_HTPASSWD", "", _readable_file,
                "the htpasswd file of client accounts, bcrypt only (`htpasswd -B -c FILE USER`); when set, every "
                "request needs Basic credentials of one of them (401 otherwise)",
                "They are checked and dropped, never forwarded. Changes to the file apply within a minute. "
                "`regcache client-config --username USER --password-stdin` writes clients' files that carry them.",
                empty_means="no accounts"),
        Setting("REGCACHE_MAX_CONNECTIONS_PER_CLIENT", "256", _positive,
                "open connections one client address may hold (all listeners); more are closed at once",
                "Refusals are logged once a minute per address."),
        Setting("REGCACHE_HEAD_TIMEOUT", "10", _positive,
                "seconds a connection gets to send a whole request head (from connect, or from its last answer)",
                "A connection that sends nothing, or a slow head, is closed."),
        Setting("REGCACHE_MAX_REQUEST_HEAD", "64k", _head_size,
                "the largest request head a client may send (request line and headers; `64k`, `16k`, ...)",
                "A larger one gets 431 and its connection is closed (all listeners, HTTP/1); refusals are "
                "logged once a minute per address. Registries' own front doors allow about as much."),
    )),
    ("Admin endpoint and mitmweb", "", (
        Setting("REGCACHE_ADMIN_HOST", "127.0.0.1", _ip_address,
                "where `/metrics` (Prometheus), `/ready` and `/live` listen, never on the client port",
                "127.0.0.1 keeps it on this machine; 0.0.0.0 lets Prometheus and other containers reach it "
                "(compose, Kubernetes), and then needs REGCACHE_ADMIN_TOKEN."),
        Setting("REGCACHE_ADMIN_PORT", "5070", _port, "the admin endpoint's port",
                "It must differ from REGCACHE_PORT, the data plane's and the egress ports."),
        Setting("REGCACHE_ADMIN_TOKEN", "", _text,
                "Bearer token `/metrics` and `/ready` ask for (`Authorization: Bearer <token>`, else 401; "
                "`/live` stays open); required when `REGCACHE_ADMIN_HOST` is not loopback",
                empty_means="none asked"),
        Setting("REGCACHE_WEB_MAX_FLOWS", "2000", _positive,
                "finished flows mitmweb keeps (`regcache up --web`); older ones are dropped, so memory stays bounded",
                "The addon's option regcache_web_max_flows."),
        Setting("REGCACHE_WEB_PASSWORD", "", _text,
                "the password of mitmweb's UI (mitmproxy 11.1.2 and later): plain, or an argon2 hash starting with `$`",
                "mitmproxy 11.0 has none, so its UI stays on 127.0.0.1. Needed to bind the UI to another address "
                "(`--set web_host=...`).",
                empty_means="a token per run: `regcache up --web` prints the URL that logs in with it", strip=False),
    )),
    ("Replicas",
     "Several regcache replicas behave as one cache when they share a Redis (state: tags, upstream state, "
     "usage, who is downloading what) and their caches' storage (K_STORAGE on a shared volume). See "
     "docs/cluster.md.", (
        Setting("REGCACHE_REDIS_URL", "", _redis_url,
                "the Redis (or Valkey) replicas share: `redis://[:password@]host:port/db`, `rediss://` for TLS",
                "Give regcache an instance (or db) of its own with `maxmemory-policy noeviction`. While it cannot "
                "be reached, each replica goes on with state of its own and says so once (log, /ready, "
                "regcache_shared_state_up).",
                empty_means="one node: its state stays in this process"),
        Setting("REGCACHE_REDIS_TIMEOUT", "0.5", _seconds,
                "seconds every Redis call gets; one that misses it counts as Redis being down"),
        Setting("REGCACHE_CLUSTER_SECRET", "", _text,
                "a secret all replicas share (16 characters or more, e.g. `openssl rand -hex 32`): it signs what "
                "one replica sends another, and is the caches' registry:2 `http.secret`",
                "Required with REGCACHE_REDIS_URL. Peers' signed requests pass REGCACHE_CLIENTS and htpasswd; "
                "unsigned ones never do.", empty_means="one node"),
    )),
    ("Object storage (K_STORAGE=s3://...)",
     "The AWS SDK's own variables, read from .env or the environment; used only by caches whose K_STORAGE is "
     "s3://BUCKET/PREFIX. The credentials go to registry:2 in its environment, never in a file or the process "
     "list. See docs/storage-s3.md for AWS S3, Ceph RGW, SeaweedFS and MinIO, and the permissions needed.", (
        Setting("AWS_ENDPOINT_URL_S3", "", _optional_url,
                "the S3 API's base URL, for a store other than AWS S3 (Ceph RGW, SeaweedFS, MinIO): "
                "`https://s3.example.com:8333`, no path; buckets are then addressed by path",
                empty_means="`AWS_ENDPOINT_URL`'s value"),
        Setting("AWS_ENDPOINT_URL", "", _optional_url, "the same, for every AWS service (the SDK's fallback)",
                empty_means="AWS S3 in `AWS_REGION`"),
        Setting("AWS_REGION", "", _region, "the store's region (any name a store other than AWS S3 accepts)",
                empty_means="us-east-1"),
        Setting("AWS_ACCESS_KEY_ID", "", _text, "the access key regcache and its caches sign with",
                empty_means="the SDK's own chain (instance role, web identity, ~/.aws)"),
        Setting("AWS_SECRET_ACCESS_KEY", "", _text, "its secret key", empty_means="the SDK's own chain",
                strip=False),
        Setting("AWS_SESSION_TOKEN", "", _text,
                "the session token of temporary credentials (STS AssumeRole, IRSA), with the two keys above",
                "regcache signs with it and its caches get it in their environment (registry:2 2.8's s3 driver "
                "has no config key for it), never in a file or a log. Temporary credentials expire: restart "
                "with fresh ones, or leave the three empty for the SDK's own chain.",
                empty_means="long-lived keys"),
        Setting("REGCACHE_S3_REDIRECT", "false", _bool,
                "warm layers by a 307 to a presigned URL of the object (valid 5 minutes): bytes never touch regcache",
                "Only where every client can reach the store at AWS_ENDPOINT_URL_S3 (or AWS S3) itself. `false`: "
                "the data plane streams the object from the store (clients reach only regcache)."),
        Setting("REGCACHE_S3_COPIES_MAX_DISK", "10G", _size_or_zero,
                "disk for the data plane's local copies of warm blobs (in the data dir); past it, the least "
                "recently served copies go",
                "A whole GET of a blob with no copy reads the object from the store once into a copy while it "
                "is sent, and concurrent GETs of it follow that one read; later GETs (Range too) are sent from "
                "the copy, its bytes checked against the digest as they were written. A copy is served only "
                "while the store holds the blob for the repository asked. `0`: no copies, every GET streams "
                "the object from the store."),
        Setting("REGCACHE_S3_READ_PARTS", "4", _positive,
                "ranged GETs at once when a local copy reads an object from the store (its parts, in order)",
                "AWS S3 serves each connection roughly 85-100 MB/s and recommends parallel byte-range GETs: a "
                "blob's first read goes up to this many times as fast. Each part in flight holds its bytes in "
                "memory (REGCACHE_S3_READ_PART_SIZE + 1 MiB each), and each part is a GET the store bills. "
                "Objects smaller than two parts are read by one GET. `1`: one GET per object, faster with a "
                "store that has no per-connection limit (on the same host: docs/storage-s3.md)."),
        Setting("REGCACHE_S3_READ_PART_SIZE", "8M", _part_size, "bytes of each of those parts"),
    )),
    ("Disk", "", (
        Setting("REGCACHE_MAX_DISK", "", _optional_size,
                "disk budget over all caches run here, e.g. `50G`; past it, the least recently pulled blobs (and "
                "manifests only they serve) are evicted down to 90% of it",
                "k, M, G, T are binary units. K_MAX_DISK gives one cache a budget of its own.",
                empty_means="no budget"),
        Setting("REGCACHE_MIN_FREE_DISK", "1G", _size_or_zero,
                "a cache's disk with less free space is reported not ready (`/ready`)"),
    )),
    ("Stopping", "", (
        Setting("REGCACHE_STOP_GRACE", "30", _positive, "seconds pulls in flight get to finish after SIGTERM or Ctrl-C"),
    )),
)
SETTINGS: tuple[Setting, ...] = tuple(setting for _, _, settings in SECTIONS for setting in settings)
SETTING: Mapping[str, Setting] = {s.name: s for s in SETTINGS}

# A registry's own settings: <KEY>_REGISTRY and so on.
REGISTRY_SETTINGS: tuple[Setting, ...] = (
    Setting("REGISTRY", "", _registry_name, "the name clients pull from, e.g. `docker.io`, `registry.k8s.io`",
            required=True),
    Setting("UPSTREAM", "", base_url, "the real registry's base URL (`https://...`, no path), e.g. "
            "`https://registry-1.docker.io`", required=True),
    Setting("CACHE", "", _cache_url,
            "its registry:2 pull-through cache's base URL, e.g. `http://127.0.0.1:5001`, or `none` to pass "
            "requests straight to the upstream, uncached",
            "`regcache up` runs every cache whose URL is on loopback (127.0.0.1, [::1], localhost), without TLS, "
            "so such a URL must be http://; other URLs are run elsewhere, e.g. by docker compose.", required=True),
    Setting("USERNAME", "", _text, "upstream credentials, with `K_PASSWORD`: set both or neither",
            "Never put them in a URL.", empty_means="anonymous"),
    Setting("PASSWORD", "", _text, "the password (or token) of `K_USERNAME`", empty_means="anonymous"),
    Setting("EGRESS_PORT", "", _optional_port,
            "an egress port of registry K's own",
            "docker-compose.yml pins them this way, so the order of REGCACHE_REGISTRIES does not matter.",
            empty_means="`REGCACHE_EGRESS_PORT` + its position in `REGCACHE_REGISTRIES`"),
    Setting("REPOSITORIES", "", _repository_patterns,
            "glob patterns of the repositories served (`library/*,myteam/*`; `*` also matches `/`); others get "
            "404 NAME_UNKNOWN and no backend is asked",
            "Use it when K_USERNAME can read private repositories that not every client should.", empty_means="all"),
    Setting("MAX_DISK", "", _optional_size, "a disk budget of registry K's cache alone, e.g. `20G` (see "
            "`REGCACHE_MAX_DISK`)", empty_means="none"),
    Setting("STORAGE", "", _storage_location,
            "the cache's storage root (registry:2's rootdirectory) as this machine sees it, read by the data plane; "
            "for a cache `regcache up` runs, also where it puts it; or `s3://BUCKET/PREFIX`: an S3-compatible "
            "object store (see docs/storage-s3.md)",
            "Replicas may all point one registry's K_STORAGE at one directory of a shared volume (NFS, a "
            "ReadWriteMany volume), or at one bucket and prefix: what one stored is warm on all. See "
            "docs/cluster.md. s3:// is for a cache `regcache up` runs: it writes registry:2's s3 driver config, "
            "creates the bucket if missing and checks at start that it can write there; the store is reached "
            "as the AWS_* settings say.",
            empty_means="`<data dir>/<key in lower case>/storage` for caches `regcache up` runs (where it puts "
            "them); none for others, whose layers all stream through the proxy"),
    Setting("TOKEN_REALMS", "", _host_names,
            "hosts, besides the upstream's own registrable domain (`auth.docker.io` for `registry-1.docker.io`), "
            "whose token realm may get K's credentials", empty_means="none"),
)
REGISTRY_SETTING: Mapping[str, Setting] = {s.name: s for s in REGISTRY_SETTINGS}

# The registries served out of the box: key -> its REGISTRY, UPSTREAM and CACHE.
DEFAULT_REGISTRIES: Mapping[str, tuple[str, str, str]] = {
    "DOCKERHUB": ("docker.io", "https://registry-1.docker.io", "http://127.0.0.1:5001"),
    "GHCR": ("ghcr.io", "https://ghcr.io", "http://127.0.0.1:5002"),
    "QUAY": ("quay.io", "https://quay.io", "http://127.0.0.1:5003"),
}

# What a setting left out of the environment and .env is.
DEFAULTS: Mapping[str, str] = {
    **{s.name: s.default for s in SETTINGS},
    **{f"{key}_{name}": value for key, values in DEFAULT_REGISTRIES.items()
       for name, value in zip(("REGISTRY", "UPSTREAM", "CACHE"), values)},
}
