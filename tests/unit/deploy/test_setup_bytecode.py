"""The checkout's setup leaves bytecode for every agent module (``scripts/setup.sh``, step 6), so
an agent started from it, a lab agent included, reads bytecode even where the environment
forbids writing any (``PYTHONDONTWRITEBYTECODE``): compiling them from source cost every start
about 0.13 s of CPU and 3 MiB of RSS, 0.4 MiB of it held at rest (ARCHITECTURE.md, "Bytecode")."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.unit.deploy.manifests import REPO

AGENT = REPO / "agent"


def _code_objects(module: str) -> list[str]:
    """Where a fresh interpreter that may not write bytecode took each code object it made to
    import ``module`` from (``-v``): a ``.pyc`` (bytecode read) or a ``.py`` (compiled)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-v", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=env,
    )
    prefix = "# code object from "
    return [
        line.removeprefix(prefix).strip("'")
        for line in result.stderr.splitlines()
        if line.startswith(prefix)
    ]


def test_an_agent_reads_every_module_of_its_own_from_bytecode() -> None:
    """What the agent process imports at start (``agent.app`` and the node proxy), under
    ``PYTHONDONTWRITEBYTECODE=1``: every module of ``agent/`` comes from a current ``.pyc``,
    none is compiled from its source. Fails after an edit until ``make setup`` compiles the
    edited module again (the agent then compiles that one at each start, as before)."""
    found = [p for p in _code_objects("agent.app, agent.proxy.server") if p.startswith(str(AGENT))]
    compiled = sorted(os.path.relpath(p, REPO) for p in found if p.endswith(".py"))
    assert not compiled, f"compiled from source (run `make setup`): {', '.join(compiled)}"
    assert sum(p.endswith(".pyc") for p in found) > 50  # the agent's modules, read as bytecode
