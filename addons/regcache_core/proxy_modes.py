"""The proxy's listeners as mitmproxy mode specs: the client listener on REGCACHE_PORT and one
egress listener per cached registry. Both the addon (its defaults for a plain `mitmdump -s`) and
`regcache up` (which passes them as `--mode` flags) use this one list."""

from __future__ import annotations

from .config import Config

# Reverse mode needs a destination, but every request gets its own from routing, so this
# placeholder is never contacted (connection_strategy=lazy keeps mitmproxy from dialling it).
PLACEHOLDER_DESTINATION = "http://127.0.0.1:1"


def proxy_modes(config: Config) -> list[str]:
    egress = [
        f"reverse:{PLACEHOLDER_DESTINATION}@{config.egress_host}:{r.egress_port}"
        for r in config.registries
        if r.egress_port is not None
    ]
    return [f"reverse:{PLACEHOLDER_DESTINATION}@{config.port}", *egress]
