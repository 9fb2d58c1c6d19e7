"""The netlink helper child: its errors arrive as the exceptions the datapath handles, and a helper
that hangs or dies is replaced. Only read-only operations run here (in the test's own network
namespace); the routing and tc changes are covered by the root datapath tests."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from agent.datapath.netlink import AttachError, HelperError, NetlinkHelper


@pytest.fixture
def helper() -> Iterator[NetlinkHelper]:
    h = NetlinkHelper(timeout=5.0)
    try:
        yield h
    finally:
        h.close()


def test_observe_reports_interfaces_and_a_missing_uplink_is_a_lookup_error(
    helper: NetlinkHelper,
) -> None:
    seen = helper.call("observe", pods=["127.0.0.1"], uplinks=[])
    assert set(seen) == {"ifaces", "attached", "uplinks"}
    assert seen["ifaces"] == {"127.0.0.1": None}  # a local route is no pod's interface
    with pytest.raises(LookupError, match="nm-no-such0"):
        helper.call("observe", pods=[], uplinks=["nm-no-such0"])


def test_a_failed_attach_is_reported_per_interface(helper: NetlinkHelper) -> None:
    done = helper.call("apply", attach=[(2_000_000_000, 0, "nm_pod_ingress")], detach=[])
    assert done["attached"] == []
    [(ifindex, message)] = done["failed"]
    assert ifindex == 2_000_000_000 and "attaching nm_pod_ingress" in message


def test_unknown_operations_are_the_helpers_bug_not_a_kernel_error(helper: NetlinkHelper) -> None:
    with pytest.raises(RuntimeError, match="unknown operation 'nope'") as info:
        helper.call("nope")
    assert not isinstance(info.value, (OSError, AttachError))


def test_a_dead_helper_is_replaced_by_the_next_call(helper: NetlinkHelper) -> None:
    helper.call("attached")
    first = helper.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    for _ in range(500):  # until it is a zombie: dead between two calls, not during one
        with open(f"/proc/{first}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert isinstance(helper.call("attached"), dict)
    assert helper.pid not in (None, first)


def test_a_hung_helper_is_killed_and_named_in_the_error() -> None:
    # The timeout also bounds the first answer of a new helper, which includes starting Python
    # and importing pyroute2: over 1 s on this 2-core machine while the suite runs in parallel.
    helper = NetlinkHelper(timeout=5.0)
    try:
        helper.call("attached")
        hung = helper.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        with pytest.raises(HelperError, match=rf"pid {hung}.*no answer within 5s.*signal 9"):
            helper.call("attached")
        assert isinstance(helper.call("attached"), dict)  # a new helper answers
        assert helper.pid != hung
    finally:
        helper.close()


def test_close_ends_the_helper(helper: NetlinkHelper) -> None:
    helper.call("attached")
    pid = helper.pid
    assert pid is not None
    helper.close()
    assert helper.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
