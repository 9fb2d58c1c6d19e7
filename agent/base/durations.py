"""Durations on the command line: ``90s``, ``30m``, ``24h``, ``7d``.

Shared by ``nodemesh ca`` (``--max-ttl``, ``--min-ttl``) and ``nodemesh agent`` (``--cert-ttl``),
so both commands accept the same spelling and reject a bad one with the same message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re

_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> dt.timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 24h or 7d")
    return dt.timedelta(seconds=int(match[1]) * _UNITS[match[2]])
