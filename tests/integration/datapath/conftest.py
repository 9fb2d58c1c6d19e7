"""Fixtures for datapath tests: a lab (namespaces only) with node1's datapath in-process."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from agent.lab.handle import Lab
from tests.integration.datapath.harness import TOPOLOGY, NodeDatapath, serve


@pytest.fixture
def dplab(lab_factory: Callable[..., Lab]) -> Lab:
    """The datapath topology, without mesh processes (the test runs the datapath)."""
    return lab_factory(topology=TOPOLOGY, components=False)


@pytest.fixture
def node1(dplab: Lab) -> Iterator[NodeDatapath]:
    harness = NodeDatapath(dplab, "node1")
    try:
        harness.start()
        yield harness
    finally:
        harness.stop()


@pytest.fixture
def servers(dplab: Lab) -> Iterator[None]:
    """Servers answering ``server <peer>`` on 8080, 9090 and 7070 in every pod."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for pod in ("client", "neighbor", "outsider", "server", "plain"):
            for port in (8080, 9090, 7070):
                procs.append(serve(dplab, pod, port))
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()
