"""Gateway API durations (GEP-2257): ``1h``, ``500ms``, ``1m30s``.

A subset of Go's ``time.ParseDuration`` every implementation reads the same way: one to four
``<1-5 digits><unit>`` groups, units ``h``, ``m``, ``s``, ``ms``, no sign, no fraction, no
spaces. Parsed here rather than with the CLI's ``agent.base.durations`` because the spelling
(``ms``, compound values) differs and a route's error must name the field.
"""

from __future__ import annotations

import re

_WHOLE = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_PART = re.compile(r"([0-9]{1,5})(ms|h|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_gateway_duration(text: str) -> float:
    """Seconds; raises ``ValueError`` with the accepted form."""
    if not isinstance(text, str) or not _WHOLE.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a Gateway API duration: use up to four <number><unit> parts, "
            "units h, m, s or ms (for example 10s, 500ms, 1m30s)"
        )
    return sum(int(n) * _SECONDS[unit] for n, unit in _PART.findall(text))
