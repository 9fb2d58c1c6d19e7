"""Shared fixtures. ``lab`` / ``lab_factory``: a test's own lab, always torn down."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from hypothesis import settings

from agent.lab.handle import Lab, LabFactory

# ``make test`` (and CI) runs every hypothesis test on the same examples each time
# (``derandomize``: a seed from the test itself), so its verdict depends on the code alone; a
# random input that fails once in many runs is ``make fuzz``'s to find (random examples, many
# more of them: ``tests/fuzzing.py``), and then becomes an ``@example``.
settings.register_profile("test", derandomize=True)
settings.register_profile("fuzz", derandomize=False)
settings.load_profile("fuzz" if os.environ.get("NODEMESH_FUZZ_EXAMPLES") else "test")

# Tests call grpcio in this process and then fork children with ``preexec_fn`` (``Lab.popen``
# enters a pod's network namespace between fork and exec). With gRPC's fork support on, its
# fork handlers restart its poller in the child, where the descriptors ``close_fds`` closed make
# it fail before the exec (grpc/grpc#43055): a pod server that never starts. Nothing here
# relies on gRPC surviving a fork.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """``lab_factory(topology=None, components=True, timeout=60)`` builds a lab with a random
    name (so concurrent tests never collide) and removes it after the test, pass or fail."""
    if os.geteuid() != 0:
        pytest.skip("a lab needs root (network namespaces)")
    names: list[str] = []

    def make(topology: str | None = None, components: bool = True, timeout: float = 60.0) -> Lab:
        name = "t" + secrets.token_hex(3)
        names.append(name)
        return Lab.up(name, topology=topology, components=components, timeout=timeout)

    try:
        yield make
    finally:
        for name in names:
            Lab(name).down()


@pytest.fixture
def lab(lab_factory: LabFactory) -> Lab:
    """A lab of the default topology with whatever mesh components exist."""
    return lab_factory()
