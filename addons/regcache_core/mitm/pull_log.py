"""PullLogger: the pull log file (regcache_core/observe/pull_log.py's PullLog), opened with the settings;
the Recorder hands it each client request's PullRecord."""

from __future__ import annotations

from ..observe.pull_log import PullLog, PullRecord
from .settings import Settings


class PullLogger:
    """The pull log file, (re)opened with the settings; `write` is a Recorder sink."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log: PullLog | None = None

    def configure(self, updated: set[str]) -> None:
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None:
            if self.log:
                self.log.close()
            self.log = PullLog(config.pull_log, config.pull_log_stdout)

    def done(self) -> None:
        if self.log:
            self.log.close()

    def write(self, record: PullRecord) -> None:
        if self.log is not None:
            self.log.write(record)
