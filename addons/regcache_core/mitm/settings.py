"""Settings: regcache's configuration for the other addons; MirrorDefaults: the mitmproxy options
that make a plain `mitmdump -s addons/regcache.py` a registry mirror."""

from __future__ import annotations

import logging

from mitmproxy import ctx

from ..config import Config, ConfigError, load_config, prepare_directory
from ..stack.listeners import cannot_listen, proxy_listeners, proxy_modes

logger = logging.getLogger(__name__)


class Settings:
    """Loads regcache's configuration (environment + .env) for the other addons."""

    config: Config | None = None

    def load(self, loader) -> None:
        loader.add_option("regcache_env_file", str, ".env", "The .env file regcache reads its settings from.")

    def configure(self, updated: set[str]) -> None:
        if "regcache_env_file" in updated:
            try:
                config = load_config(env_file=ctx.options.regcache_env_file)
                prepare_directory("REGCACHE_DATA_DIR", config.data_dir)
                self.config = config
                for warning in config.warnings:
                    logger.warning(f"regcache: {warning}")
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
        self.switched_mode = False

    def configure(self, updated: set[str]) -> None:
        if "mode" not in updated or self.settings.config is None:
            return
        config = self.settings.config
        wanted = {
            "mode": proxy_modes(config),
            "keep_host_header": True,  # routing reads the client's Host header
            "connection_strategy": "lazy",
            "stream_large_bodies": "1m",  # layers are streamed, never held in memory
            "regcache_web_max_flows": config.web_max_flows,
        }
        if "web_columns" in ctx.options.keys():  # mitmweb: show each flow's regcache label
            wanted["web_columns"] = [*ctx.options.web_columns, "comment"]
        changes = {name: value for name, value in wanted.items() if not ctx.options.has_changed(name)}
        if "mode" in changes and (problems := list(filter(None, map(cannot_listen, proxy_listeners(config))))):
            # Said here, and no listener opened: mitmproxy's message for a taken port names only
            # the placeholder destination. An error logged while starting makes mitmproxy exit.
            logger.error(f"regcache: {problems[0]}")
            changes["mode"] = []
        if changes:
            self.switched_mode = self.switched_mode or "mode" in changes
            ctx.options.update(**changes)

    def running(self) -> None:
        # mitmproxy loads scripts in a task of its event loop, and on Python 3.12+ (eager tasks)
        # it opens its listeners before that task runs; a mode changed before `running` is then
        # not applied. Announcing the mode again now makes it apply; where the listeners
        # already match (mitmproxy 11 on Python 3.11), nothing changes. `regcache up` passes
        # the modes as flags, so it never gets here.
        if self.switched_mode:
            ctx.options.update(mode=ctx.options.mode)
