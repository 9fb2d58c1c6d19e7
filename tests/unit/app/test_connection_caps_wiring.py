"""What each kind of agent admits at accept (``wiring.connection_caps``) and where its refusals
are counted for ``/metrics`` (``wiring.rejection_counts``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from agent.base.conncaps import (
    PEER_LIMIT,
    POD_LIMIT,
    SourceLimit,
    descriptor_limit,
    process_cap,
)
from agent.base.constants import Listener
from agent.config import AgentConfig
from agent.wiring import connection_caps, effective_config, rejection_counts

CONFIG = AgentConfig(node="n1", pin_dir=Path("/nonexistent"), max_connections_per_pod=7)


def test_the_node_proxy_limits_pods_on_15001_and_leaves_15006_and_15008_to_itself() -> None:
    caps = connection_caps(CONFIG, passthrough=False)
    assert caps.per_source == {Listener.OUTBOUND: SourceLimit(7, POD_LIMIT, "pod")}


def test_plain_passthrough_also_limits_each_address_on_15006_and_15008() -> None:
    caps = connection_caps(CONFIG, passthrough=True)
    assert caps.per_source[Listener.INBOUND] == SourceLimit(256, PEER_LIMIT, "client")
    assert caps.per_source[Listener.HBONE] == SourceLimit(256, PEER_LIMIT, "peer")


def test_without_a_node_proxy_the_metrics_count_the_accept_loops_refusals() -> None:
    caps = connection_caps(CONFIG, passthrough=True)
    gate = caps.gate(Listener.OUTBOUND)
    for _ in range(8):
        gate.admit("10.0.0.1")
    counts = rejection_counts(SimpleNamespace(proxy=None, caps=caps))  # type: ignore[arg-type]
    assert counts is not None and counts() == {POD_LIMIT: 1}
    proxy = SimpleNamespace(connections=SimpleNamespace(rejections={"strict_mtls": 2}))
    counts = rejection_counts(SimpleNamespace(proxy=proxy, caps=caps))  # type: ignore[arg-type]
    assert counts is not None and counts() == {"strict_mtls": 2}


def test_the_config_dump_shows_what_each_process_may_hold() -> None:
    dumped = effective_config(CONFIG)
    assert dumped["max_connections"] is None and dumped["max_connections_per_pod"] == 7
    assert dumped["max_connections_per_process"] == process_cap(descriptor_limit())
    assert dumped["max_connections_per_pod_per_process"] == 7


def test_by_default_a_pod_may_hold_half_of_its_process_cap_on_15001() -> None:
    caps = connection_caps(AgentConfig(node="n1", pin_dir=Path("/nonexistent")), passthrough=False)
    (limit,) = caps.per_source.values()
    assert limit == SourceLimit(process_cap(descriptor_limit()) // 2, POD_LIMIT, "pod")
    dumped = effective_config(AgentConfig(node="n1", pin_dir=Path("/nonexistent")))
    assert dumped["max_connections_per_pod_per_process"] == limit.most


def test_with_a_node_proxy_its_hbone_streams_are_charged_and_a_connection_its_own_only() -> None:
    """``count_in_proxy`` (the agent and each worker): refusals in the proxy's counter, the
    15008 handler charging each stream's pod socket, so the 15008 gate charges one."""
    from agent.state import StateStore
    from agent.wiring import count_in_proxy, node_proxy

    caps = connection_caps(CONFIG, passthrough=False)
    proxy = node_proxy(CONFIG, StateStore(), identities=SimpleNamespace())  # type: ignore[arg-type]
    count_in_proxy(caps, proxy)
    assert proxy.proxy.core.caps is caps and caps.reject == proxy.connections.reject
    hbone, outbound = caps.gate(Listener.HBONE), caps.gate(Listener.OUTBOUND)
    assert hbone.admit("10.0.0.1") and outbound.admit("10.0.0.2")
    assert caps.take_stream("s")
    assert (caps.used, caps.held, caps.streams) == (4, 2, 1)
