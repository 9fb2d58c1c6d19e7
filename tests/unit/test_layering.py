"""No import cycle between the agent's packages and top-level modules.

import-linter (``make lint``) checks the declared layers; this test guards the property those
layers exist for, with nothing to configure: it reads every module of ``agent/`` with ``ast``,
so imports inside functions (the lazy ones that keep ``bcc`` and ``kubernetes`` out of the CLI's
start-up) and under ``TYPE_CHECKING`` count too, and fails when the units (``agent.proxy``,
``agent.app``...) import each other in a circle, naming the circle and the files behind each
edge.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"

Edges = dict[str, dict[str, set[str]]]


def _module_name(path: Path) -> str:
    parts = path.relative_to(AGENT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    return [target, *(f"{target}.{alias.name}" for alias in node.names)]


def _unit(module: str, units: set[str]) -> str | None:
    """``agent.proxy.core`` → ``agent.proxy``; ``agent.app`` → ``agent.app``."""
    parts = module.split(".")
    if parts[0] != "agent" or len(parts) < 2:
        return None
    unit = f"agent.{parts[1]}"
    return unit if unit in units else None


def import_graph() -> Edges:
    """unit → imported unit → the files that import it."""
    files = sorted(AGENT.rglob("*.py"))
    units = {f"agent.{p.stem}" for p in AGENT.iterdir() if p.suffix == ".py" or p.is_dir()}
    edges: Edges = defaultdict(lambda: defaultdict(set))
    for path in files:
        module = _module_name(path)
        source = _unit(module, units)
        if source is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _imported(node, module, path.name == "__init__.py"):
                unit = _unit(target, units)
                if unit is not None and unit != source:
                    edges[source][unit].add(str(path.relative_to(AGENT.parent)))
    return edges


def cycles(edges: Edges) -> list[list[str]]:
    """The strongly connected components with more than one unit (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_scan_sees_lazy_imports() -> None:
    """``agent.app`` imports ``agent.sources.kube`` inside a function only: the scan must see it,
    or a cycle made of lazy imports would pass unnoticed."""
    assert "agent/app.py" in import_graph()["agent.app"]["agent.sources"]


def test_no_import_cycle_between_agent_packages() -> None:
    edges = import_graph()
    found = cycles(edges)
    report = []
    for component in found:
        report.append(" <-> ".join(component))
        for a in component:
            for b in component:
                if b in edges.get(a, {}):
                    report.append(f"  {a} -> {b}: {', '.join(sorted(edges[a][b]))}")
    assert not found, "import cycles between agent packages:\n" + "\n".join(report)
