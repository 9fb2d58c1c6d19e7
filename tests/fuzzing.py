"""How many examples a hypothesis campaign runs: small in ``make test``, large in ``make fuzz``."""

from __future__ import annotations

import os


def fuzz_examples(default: int) -> int:
    """``NODEMESH_FUZZ_EXAMPLES`` when set (``make fuzz``), else ``default``."""
    return int(os.environ.get("NODEMESH_FUZZ_EXAMPLES", str(default)))
