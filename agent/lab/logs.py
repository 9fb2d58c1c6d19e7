"""``nodemesh lab logs TARGET [--tail N] [-f]``: a lab component's log, as ``kubectl logs``.

Every process the lab starts writes one file, ``<state>/logs/<component>.log`` (``ca``,
``agent-<node>``, ``prometheus``; an agent that ``lab upgrade`` replaced appends to its
node's file, so one file tells a node's whole story). A server the demo leaves running in a pod
logs to ``<pod>.log`` there. Users think in nodes, not component names, so a node's name means
its agent; any other target is the file's own name. Following polls the file (no inotify: the
logs live on whatever /run is) and starts over when the file is truncated.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from agent.lab.topology import LabError

AGENT_PREFIX = "agent-"


def targets(logs: Path, nodes: Iterable[str]) -> dict[str, Path]:
    """Target name → log file: each node (its agent's log, written or not yet), then every
    other ``*.log`` under ``logs`` by its name (``ca``, ``prometheus``, a pod's server)."""
    found = {node: logs / f"{AGENT_PREFIX}{node}.log" for node in nodes}
    agents = {path.name for path in found.values()}
    if logs.is_dir():
        for path in sorted(logs.glob("*.log")):
            if path.name not in agents:
                found.setdefault(path.stem, path)
    return found


def resolve(logs: Path, nodes: Iterable[str], target: str, lab: str) -> Path:
    """The log of ``target`` (a node, ``agent-<node>``, ``ca``, ...), or a :class:`LabError`
    naming the known targets."""
    known = targets(logs, nodes)
    name = target.removeprefix(AGENT_PREFIX) if target.startswith(AGENT_PREFIX) else target
    if name in known:
        return known[name]
    raise LabError(
        f"no log for {target!r} in lab {lab}; targets: {', '.join(known) or 'none'} "
        f"(logs are in {logs})"
    )


def tail(f: BinaryIO, lines: int | None) -> bytes:
    """The last ``lines`` lines of ``f`` (all with ``None`` or a negative count, as ``kubectl
    logs --tail=-1``), leaving ``f`` at its end."""
    if lines is None or lines < 0:
        return f.read()
    return b"".join(collections.deque(f, maxlen=lines))


def follow(f: BinaryIO, write: Callable[[bytes], None], wait: Callable[[], bool]) -> None:
    """Copy what is appended to ``f`` to ``write`` from its current position; ``wait`` is called
    whenever nothing new is there and returns False to stop (Ctrl-C in the CLI). A file that
    got shorter was truncated: it is read again from its start."""
    while True:
        chunk = f.read(65536)
        if chunk:
            write(chunk)
            continue
        if os.fstat(f.fileno()).st_size < f.tell():
            f.seek(0)
            continue
        if not wait():
            return
