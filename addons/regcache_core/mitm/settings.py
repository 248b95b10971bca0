"""Settings: regcache's configuration for the other addons; MirrorDefaults: the mitmproxy options
that make a plain `mitmdump -s addons/regcache.py` a registry mirror."""

from __future__ import annotations

import logging

from mitmproxy import ctx

from ..config import Config, ConfigError, load_config

logger = logging.getLogger(__name__)

# Reverse mode needs a destination, but every request gets its own from routing, so this
# placeholder is never contacted (connection_strategy=lazy keeps mitmproxy from dialling it).
PLACEHOLDER_DESTINATION = "http://127.0.0.1:1"


class Settings:
    """Loads regcache's configuration (environment + .env) for the other addons."""

    config: Config | None = None

    def load(self, loader) -> None:
        loader.add_option("regcache_env_file", str, ".env", "The .env file regcache reads its settings from.")

    def configure(self, updated: set[str]) -> None:
        if "regcache_env_file" in updated:
            try:
                self.config = load_config(env_file=ctx.options.regcache_env_file)
            except ConfigError as e:
                # Logged, not raised as OptionsError: mitmproxy would print a traceback for a
                # script's OptionsError, where one line says it all. An error logged during
                # start-up makes mitmproxy exit (its errorcheck addon); later, the last good
                # config stays in force.
                logger.error(f"regcache: {e}")


class MirrorDefaults:
    """Turns a plain `mitmdump -s addons/regcache.py` into a registry mirror on REGCACHE_PORT.

    Only options still at mitmproxy's defaults are changed, so explicit flags win. It also
    brings REGCACHE_WEB_MAX_FLOWS to the regcache_web_max_flows option (used by mitmweb).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def configure(self, updated: set[str]) -> None:
        if "mode" not in updated or self.settings.config is None:
            return
        config = self.settings.config
        egress = [
            f"reverse:{PLACEHOLDER_DESTINATION}@{config.egress_host}:{r.egress_port}"
            for r in config.registries
            if r.egress_port is not None
        ]
        wanted = {
            "mode": [f"reverse:{PLACEHOLDER_DESTINATION}@{config.port}", *egress],
            "keep_host_header": True,  # routing reads the client's Host header
            "connection_strategy": "lazy",
            "stream_large_bodies": "1m",  # layers are streamed, never held in memory
            "regcache_web_max_flows": config.web_max_flows,
        }
        if "web_columns" in ctx.options.keys():  # mitmweb: show each flow's regcache label
            wanted["web_columns"] = [*ctx.options.web_columns, "comment"]
        changes = {name: value for name, value in wanted.items() if not ctx.options.has_changed(name)}
        if changes:
            ctx.options.update(**changes)
