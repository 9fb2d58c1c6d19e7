"""A real in-process CA on loopback and the state it checks nodes against."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ca.inprocess import InProcessCA
from agent.state import StateStore
from tests.workloads import store_with, workload


@pytest.fixture
def store() -> StateStore:
    return store_with(
        workload("client", "node1", "10.244.1.2"), workload("server", "node1", "10.244.1.3")
    )


@pytest.fixture
def ca(tmp_path: Path, store: StateStore) -> Iterator[InProcessCA]:
    tokens = {"node1": InProcessCA.new_token()}
    with InProcessCA(tmp_path / "ca", store, node_tokens=tokens) as authority:
        yield authority
