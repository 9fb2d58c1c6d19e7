"""Runtime log levels (``POST /logging?level=debug[&logger=agent.proxy]`` on the admin API).

Why only levels: an operator chasing one bad connection wants DEBUG from the proxy for a few
minutes without restarting the agent (a restart would drop the very connections under study),
and the access log (``nodemesh.access``) can be silenced the same way. Names and levels are
checked against closed sets, so a typo is an error that lists what is allowed, not a no-op.
"""

from __future__ import annotations

import logging
import sys

LEVELS = ("debug", "info", "warning", "error", "critical")
# Loggers an operator may tune; "root" is everything.
LOGGERS = (
    "root",
    "nodemesh.access",
    "agent.proxy",
    "agent.identity",
    "agent.datapath",
    "agent.sources",
    "agent.policy",
    "agent.telemetry",
    "agent.admin",
    "agent.app",
)


# Third-party loggers that print secrets at DEBUG, held at INFO whatever the agent's level:
# hpack logs every header block it encodes or decodes (the CA client's bearer token, Huffman-
# coded but readable; the authorization and cookie headers of proxied HTTP/2 requests), and the
# official Kubernetes client every response body (the CA's root Secret with its key, the pod
# specs the agent lists with their env values).
SECRET_LOGGERS = ("hpack", "kubernetes.client.rest")
DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str | int, fmt: str = DEFAULT_FORMAT) -> None:
    """The process's logging: to stderr at ``level``, ``SECRET_LOGGERS`` at INFO at most (so
    neither ``--log-level DEBUG`` nor ``set_level`` at run time lets them print)."""
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    for name in SECRET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


class LogLevelError(ValueError):
    """An unknown level or logger name; the message lists the allowed values."""


def _logger(name: str) -> logging.Logger:
    return logging.getLogger() if name == "root" else logging.getLogger(name)


def levels() -> dict[str, str]:
    """The effective level of every tunable logger."""
    return {
        name: logging.getLevelName(_logger(name).getEffectiveLevel()).lower() for name in LOGGERS
    }


def set_level(level: str, logger: str = "root") -> dict[str, str]:
    """Set ``logger``'s level (``root``: all loggers that have none of their own)."""
    if level.lower() not in LEVELS:
        raise LogLevelError(f"unknown level {level!r}: use one of {', '.join(LEVELS)}")
    if logger not in LOGGERS:
        raise LogLevelError(f"unknown logger {logger!r}: use one of {', '.join(LOGGERS)}")
    _logger(logger).setLevel(level.upper())
    logging.getLogger(__name__).warning("log level of %s set to %s", logger, level.lower())
    return levels()
