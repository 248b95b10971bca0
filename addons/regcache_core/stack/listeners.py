"""The proxy's listeners: the client listener on REGCACHE_PORT and one egress listener per cached
registry, as mitmproxy mode specs. Both the addon (its defaults for a plain `mitmdump -s`) and
`regcache up` (which passes them as `--mode` flags) use this one list, and both check first that
each port is free: mitmproxy's own message for a taken port names only the placeholder below."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from ..config import Config

# Reverse mode needs a destination, but every request gets its own from routing, so this
# placeholder is never contacted (connection_strategy=lazy keeps mitmproxy from dialling it).
PLACEHOLDER_DESTINATION = "http://127.0.0.1:1"


@dataclass(frozen=True)
class Listener:
    host: str  # "" for every interface
    port: int
    what: str  # what listens there, for messages
    setting: str  # the variable that moves it


def proxy_listeners(config: Config) -> list[Listener]:
    egress = [
        Listener(config.egress_host, r.egress_port, f"{r.key}'s egress listener, its cache's upstream",
                 f"{r.key}_EGRESS_PORT (or REGCACHE_EGRESS_PORT, the first egress port)")
        for r in config.registries
        if r.egress_port is not None
    ]
    return [Listener("", config.port, "the client port", "REGCACHE_PORT"), *egress]


def proxy_modes(config: Config) -> list[str]:
    return [f"reverse:{PLACEHOLDER_DESTINATION}@{f'{l.host}:' if l.host else ''}{l.port}" for l in proxy_listeners(config)]


def cannot_listen(listener: Listener) -> str | None:
    """Why the port cannot be listened on now, in one line naming the setting that moves it;
    None if it can (or if the reason is mitmproxy's to report, such as an unknown address)."""
    try:
        # The addresses asyncio binds for a server on this host: both 0.0.0.0 and :: for "".
        addresses = socket.getaddrinfo(listener.host or None, listener.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except OSError:
        return None
    for family, kind, protocol, _, address in addresses:
        try:
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers: TIME_WAIT is no obstacle
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as e:  # others (no IPv6 here, say) are mitmproxy's to report, as it sees them
            if e.errno == errno.EADDRINUSE:
                return (f"port {listener.port} ({listener.what}) is in use by another program: "
                        f"stop that, or set {listener.setting} to a free port")
            if e.errno == errno.EACCES:
                return f"port {listener.port} ({listener.what}) needs privileges to listen on: set {listener.setting} to a port above 1023"
    return None
