"""Plain-text tables that fit a terminal of 100 columns.

Columns keep their natural width while the table fits; otherwise the widest shrinkable column
gives up characters first (its cells end with ``…``), so identifiers at the left stay readable.
"""

from __future__ import annotations

from collections.abc import Sequence

WIDTH = 100
GAP = "  "
MIN_COLUMN = 6


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def render(headers: Sequence[str], rows: Sequence[Sequence[object]], width: int = WIDTH) -> str:
    """``headers`` and ``rows`` as aligned columns no wider than ``width`` characters."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    budget = width - len(GAP) * (len(headers) - 1)
    while sum(widths) > budget:
        i = max(range(len(widths)), key=lambda k: widths[k])
        if widths[i] <= MIN_COLUMN:
            break
        widths[i] -= 1
    lines = [
        GAP.join(_cut(c, w).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *cells]
    ]
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"
