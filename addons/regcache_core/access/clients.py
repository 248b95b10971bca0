"""Who may use regcache: client networks (REGCACHE_CLIENTS) and accounts (REGCACHE_HTPASSWD).

regcache pulls with the upstream credentials configured for each registry, so whoever reaches
its client port can read what those credentials can. Two checks close that, each optional:

- networks: a client whose address is in none of the configured networks is refused;
- accounts: every request needs Basic credentials of an account in an htpasswd file of bcrypt
  hashes (`htpasswd -B`). The client's credentials are checked here and never forwarded.

No mitmproxy here: the addon (mitm/client_access.py) and the data plane call these.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from ..config import parse_ip

logger = logging.getLogger(__name__)

REALM = "regcache"
CHALLENGE = f'Basic realm="{REALM}"'
# A checked Authorization value is trusted this long without bcrypt (which costs milliseconds to
# hundreds of them per check); an account removed from the file stops working within it.
VERIFIED_TTL = 60.0
VERIFIED_MAX = 1024  # distinct credentials remembered; clients choose them, so the table is bounded
MAX_AUTHORIZATION = 4096  # longer values are refused unread: bcrypt reads only 72 bytes anyway

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ClientNetworks:
    """The networks allowed to use regcache; none configured means any address."""

    networks: tuple[Network, ...] = ()

    def allows(self, address: str) -> bool:
        if not self.networks:
            return True
        parsed = parse_ip(address)
        return parsed is not None and any(parsed in network for network in self.networks)


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(user, password) from a `Basic` Authorization value; None for anything else."""
    if not authorization or len(authorization) > MAX_AUTHORIZATION:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, colon, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if colon and user else None


def read_htpasswd(path: Path) -> dict[str, bytes]:
    """user -> bcrypt hash. Lines of other hash kinds are skipped with one warning each: an
    MD5 (apr1), SHA1 or crypt hash is no protection worth the name."""
    accounts = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, _, hashed = line.strip().partition(":")
        if hashed.startswith(("$2a$", "$2b$", "$2y$")):
            accounts[user] = hashed.encode()
        else:
            logger.warning("%s line %d: the account %r has no bcrypt hash (create it with `htpasswd -B`); it is ignored",
                           path, number, user)
    return accounts


class Htpasswd:
    """Accounts from an htpasswd file, re-read when the file changes.

    `verify` may run bcrypt: call it in a thread. `known` answers from memory only, for the
    credentials verified in the last VERIFIED_TTL seconds, so the event loop can use it.
    """

    def __init__(self, path: Path, clock=time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._stamp: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) of what was read
        self._accounts: dict[str, bytes] = {}
        self._verified: OrderedDict[bytes, tuple[float, str]] = OrderedDict()  # sha256(value) -> (until, user)

    def known(self, authorization: str | None) -> str | None:
        """The user of recently verified credentials, else None (not necessarily wrong ones)."""
        if not authorization:
            return None
        entry = self._verified.get(_fingerprint(authorization))
        return entry[1] if entry and entry[0] > self._clock() else None

    def verify(self, authorization: str | None) -> str | None:
        """The user whose credentials these are, or None. Blocking: reads the file, runs bcrypt."""
        credentials = basic_credentials(authorization)
        if credentials is None:
            return None
        self._reload_if_changed()
        user, password = credentials
        hashed = self._accounts.get(user)
        if hashed is None or not bcrypt.checkpw(password.encode("utf-8"), hashed):
            return None
        self._remember(_fingerprint(authorization), user)
        return user

    def _reload_if_changed(self) -> None:
        try:
            info = os.stat(self.path)
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            if stamp != self._stamp:
                self._accounts, self._stamp = read_htpasswd(self.path), stamp
                self._verified.clear()
        except OSError as e:
            # Keep the accounts last read: a file being replaced must not lock everyone out.
            logger.warning("cannot read REGCACHE_HTPASSWD %s: %s; using the accounts read before", self.path, e.strerror)

    def _remember(self, fingerprint: bytes, user: str) -> None:
        self._verified[fingerprint] = (self._clock() + VERIFIED_TTL, user)
        self._verified.move_to_end(fingerprint)
        while len(self._verified) > VERIFIED_MAX:
            self._verified.popitem(last=False)


def _fingerprint(authorization: str) -> bytes:
    # Never the value itself in memory longer than needed: it is a password.
    return hashlib.sha256(authorization.encode("utf-8", "surrogateescape")).digest()
