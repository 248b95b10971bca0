"""What regcache shows of its pulls: metrics, the pull log and its statistics, mitmweb's view, hit/miss tracking and the admin endpoint."""

from __future__ import annotations

import logging
import sys


def warn(logger: logging.Logger, message: str, *args) -> None:
    """A warning line for the operator, shown at once: mitmproxy's terminal log prints without
    flushing, so a pipe or a container's log would hold the line back until some buffer fills."""
    logger.warning(message, *args)
    sys.stdout.flush()
    sys.stderr.flush()
