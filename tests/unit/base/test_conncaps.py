"""``agent.base.conncaps``: the per-source and per-process admission of the accept loops, and the
descriptor arithmetic behind the per-process cap. Sans-IO: no socket is opened."""

from __future__ import annotations

import logging
import resource
import subprocess
import sys

import pytest

from agent.base.conncaps import (
    DESCRIPTORS_PER_CONNECTION,
    GLOBAL_LIMIT,
    PEER_LIMIT,
    POD_LIMIT,
    STREAM_LIMIT,
    ConnectionCaps,
    SourceLimit,
    process_cap,
    reserve_for,
)
from agent.base.constants import Listener

POD, OTHER = "10.0.0.1", "10.0.0.2"


def caps(total: int = 100, per_pod: int = 3) -> ConnectionCaps:
    return ConnectionCaps(total, {Listener.OUTBOUND: SourceLimit(per_pod, POD_LIMIT, "pod")})


def test_a_pod_past_its_limit_is_refused_counted_and_other_pods_are_admitted() -> None:
    c = caps(per_pod=3)
    gate = c.gate(Listener.OUTBOUND)
    assert [gate.admit(POD) for _ in range(4)] == [True, True, True, False]
    assert c.rejections == {POD_LIMIT: 1}
    assert gate.admit(OTHER)
    assert dict(gate.held) == {POD: 3, OTHER: 1}
    assert c.held == 4  # the refused one holds nothing
    gate.release(POD)  # one of its connections ended: room for one more
    assert gate.admit(POD)
    assert not gate.admit(POD)
    assert c.rejections == {POD_LIMIT: 2}


def test_every_slot_is_given_back_and_nothing_is_left_behind() -> None:
    c = caps(per_pod=2)
    gate = c.gate(Listener.OUTBOUND)
    for source in (POD, POD, OTHER):
        assert gate.admit(source)
    for source in (POD, OTHER, POD):
        gate.release(source)
    assert dict(gate.held) == {} and c.held == 0


def test_the_process_cap_counts_every_listener_together() -> None:
    c = caps(total=3, per_pod=10)
    outbound, inbound, hbone = (c.gate(slot) for slot in Listener)
    assert outbound.admit(POD) and inbound.admit(OTHER) and hbone.admit(OTHER)
    for gate in (outbound, inbound, hbone):
        assert not gate.admit("10.0.0.9")  # a source that holds nothing: the process is full
    assert c.rejections == {GLOBAL_LIMIT: 3}
    inbound.release(OTHER)
    assert hbone.admit("10.0.0.9")
    assert dict(inbound.held) == {}  # 15006 has no per-source limit here (the proxy's own)


def test_a_refusal_at_the_process_cap_comes_before_the_sources_own_limit() -> None:
    c = caps(total=2, per_pod=2)
    gate = c.gate(Listener.OUTBOUND)
    assert gate.admit(POD) and gate.admit(POD)
    assert not gate.admit(POD)
    assert c.rejections == {GLOBAL_LIMIT: 1}


def test_refusals_are_all_counted_and_logged_once_while_at_a_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.base.conncaps")

    def logged(reason: str) -> int:
        return sum(f"rejected ({reason})" in r.getMessage() for r in caplog.records)

    c = caps(total=3, per_pod=1)
    gate = c.gate(Listener.OUTBOUND)
    assert gate.admit(POD)
    for _ in range(5):
        assert not gate.admit(POD)
    assert (c.rejections[POD_LIMIT], logged(POD_LIMIT)) == (5, 1)
    gate.release(POD)  # below the limit once: the next refusal is logged again
    assert gate.admit(POD)
    assert not gate.admit(POD)
    assert (c.rejections[POD_LIMIT], logged(POD_LIMIT)) == (6, 2)

    assert gate.admit(OTHER) and gate.admit("10.0.0.3")  # the process is full now
    for source in ("10.0.0.4", "10.0.0.5", "10.0.0.6"):
        assert not gate.admit(source)
    assert (c.rejections[GLOBAL_LIMIT], logged(GLOBAL_LIMIT)) == (3, 1)
    gate.release(OTHER)
    assert gate.admit("10.0.0.4")
    assert not gate.admit("10.0.0.5")
    assert (c.rejections[GLOBAL_LIMIT], logged(GLOBAL_LIMIT)) == (4, 2)
    message = next(r.getMessage() for r in caplog.records if GLOBAL_LIMIT in r.getMessage())
    assert "3 connections" in message and "outbound from 10.0.0.4" in message


def test_refusals_go_to_the_given_counter() -> None:
    """The agent points ``reject`` at the node proxy's registry, so the refusals show in its
    rejection counter (``nodemesh_rejected_connections_total``)."""
    seen: list[tuple[str, bool]] = []
    c = ConnectionCaps(1, {Listener.HBONE: SourceLimit(1, PEER_LIMIT, "peer")})
    c.reject = lambda reason, detail, *, quiet=False: seen.append((reason, quiet))
    gate = c.gate(Listener.HBONE)
    assert gate.admit(POD)
    assert not gate.admit(POD) and not gate.admit(OTHER)
    assert seen == [(GLOBAL_LIMIT, False), (GLOBAL_LIMIT, True)]
    assert not c.rejections


@pytest.mark.parametrize("nofile", [256, 1024, 4096, 65536, 1 << 20])
def test_the_cap_and_its_reserve_fit_in_the_descriptor_limit(nofile: int) -> None:
    cap, reserve = process_cap(nofile), reserve_for(nofile)
    assert cap * DESCRIPTORS_PER_CONNECTION + reserve <= nofile
    assert reserve >= min(1024, nofile // 2)  # the control plane's share is always kept
    assert cap >= (nofile - reserve) // DESCRIPTORS_PER_CONNECTION


def test_the_documented_caps() -> None:
    """The numbers ARCHITECTURE.md and the module docstring give."""
    assert [process_cap(n) for n in (1 << 20, 65536, 1024)] == [458240, 28160, 256]


def test_the_soft_limit_is_raised_to_the_hard_one_at_start() -> None:
    """In a child: a soft limit of 512 under a hard one of 4096 (what container runtimes often
    give: 1,024 under 524,288) is raised to the hard one."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    high = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    code = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (512, {high}))\n"
        "from agent.base.conncaps import raise_descriptor_limit\n"
        "print(raise_descriptor_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == [str(high), str(high)]


def test_hbone_streams_and_connections_share_the_descriptor_budget() -> None:
    """With streams counted, a 15008 connection is charged its own descriptor and each stream
    its pod socket's: a cap of 3 connections is 6 descriptors, for connections and streams."""
    c = caps(total=3)
    c.count_streams()
    hbone, outbound = c.gate(Listener.HBONE), c.gate(Listener.OUTBOUND)
    assert hbone.admit(POD) and outbound.admit(OTHER)  # 1 + 2 descriptors
    assert [c.take_stream("s") for _ in range(4)] == [True, True, True, False]
    assert (c.used, c.held, c.streams) == (6, 2, 3)
    assert c.rejections == {STREAM_LIMIT: 1}
    assert not hbone.admit(POD)  # no room for the connection's own descriptor either
    assert c.rejections == {STREAM_LIMIT: 1, GLOBAL_LIMIT: 1}
    c.release_stream()
    assert not outbound.admit(OTHER)  # one descriptor free, a 15001 connection needs two
    assert hbone.admit(POD)  # a 15008 connection needs one
    c.release_stream()
    c.release_stream()
    assert c.take_stream("s") and c.take_stream("s")
    assert not c.take_stream("s")
    for _ in range(2):
        c.release_stream()
    hbone.release(POD)
    hbone.release(POD)
    outbound.release(OTHER)
    assert (c.used, c.held, c.streams) == (0, 0, 0)


def test_a_stream_slot_given_back_twice_is_an_error_not_room() -> None:
    c = caps(total=1)
    c.count_streams()
    assert c.take_stream("s")
    c.release_stream()
    with pytest.raises(RuntimeError, match="given back twice"):
        c.release_stream()
    assert (c.used, c.streams) == (0, 0)


def test_without_stream_counting_an_hbone_connection_is_charged_two() -> None:
    """Plain passthrough: a 15008 connection is relayed whole to one upstream."""
    c = caps(total=2)
    hbone = c.gate(Listener.HBONE)
    assert hbone.admit(POD) and hbone.admit(OTHER)
    assert not hbone.admit("10.0.0.3")
    assert c.used == 4


def test_streams_cannot_be_counted_once_the_hbone_gate_charges_two() -> None:
    c = caps()
    c.gate(Listener.HBONE)
    with pytest.raises(RuntimeError, match="HBONE listener's gate"):
        c.count_streams()


def test_stream_refusals_are_all_counted_and_logged_once_while_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.base.conncaps")
    c = caps(total=1)
    c.count_streams()
    assert c.gate(Listener.HBONE).admit(POD) and c.take_stream("s")
    for _ in range(4):
        assert not c.take_stream("spiffe://x (10.0.0.1) -> 10.0.0.2:80")
    c.release_stream()
    assert c.take_stream("s")
    assert not c.take_stream("again")
    lines = [r.getMessage() for r in caplog.records if STREAM_LIMIT in r.getMessage()]
    assert c.rejections[STREAM_LIMIT] == 5 and len(lines) == 2
    assert "10.0.0.2:80: answered 503" in lines[0] and "1 streams' sockets" in lines[0]
