"""`nodemesh agent` flags: defaults of contract 2 and errors that name the flag."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError, add_arguments, from_args


def parse(*argv: str) -> AgentConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)))


def test_defaults_follow_the_contract() -> None:
    cfg = parse("--node", "node1", "--cluster-file", "/x.yaml")
    assert cfg.pin_dir == Path("/sys/fs/bpf/nodemesh/node1")
    assert (cfg.ready_port, cfg.metrics_port, cfg.admin_address) == (
        15021,
        15020,
        ("127.0.0.1", 15000),
    )
    assert not cfg.fail_open and cfg.drain_seconds == 5.0
    assert not cfg.splice  # the same-node splice is opt-in (ARCHITECTURE.md)
    dp = cfg.datapath()
    assert dp.marks.proxy_mark == 0x539 and dp.routing.capture_mark == cfg.capture_mark


def test_splice_flag_turns_the_same_node_splice_on() -> None:
    assert parse("--node", "n", "--in-cluster", "--splice").splice


@pytest.mark.parametrize(("argv", "relay"), [((), True), (("--no-h2-relay",), False)])
def test_the_h2_frame_relay_is_on_unless_turned_off_and_reaches_the_proxy(
    argv: tuple[str, ...], relay: bool
) -> None:
    from agent.state import StateStore
    from agent.wiring import node_proxy

    cfg = parse("--node", "n", "--in-cluster", *argv)
    assert cfg.h2_relay is relay
    component = node_proxy(cfg, StateStore(), None)  # type: ignore[arg-type]
    assert component.proxy.core.settings.h2_relay is relay


def test_uplinks_accept_lists_and_repeats() -> None:
    cfg = parse("--node", "n", "--in-cluster", "--uplink", "eth0", "eth1", "--uplink", "bond0")
    assert cfg.uplinks == ("eth0", "eth1", "bond0")


def test_hex_marks_and_tables() -> None:
    cfg = parse("--node", "n", "--in-cluster", "--capture-mark", "0x77", "--route-table", "200")
    assert cfg.routing.capture_mark == 0x77 and cfg.routing.table == 200


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--node", "n"], "--cluster-file PATH, --kubeconfig PATH or --in-cluster"),
        (["--node", "n", "--in-cluster", "--ca-address", "ca:15012"], "go together"),
        (["--node", "n", "--in-cluster", "--admin-address", "0.0.0.0:15000"], "loopback"),
        (["--node", "n", "--in-cluster", "--admin-address", "localhost"], "HOST:PORT"),
        (["--node", "n", "--in-cluster", "--capture-mark", "0x539"], "proxy mark"),
        (["--node", "n", "--in-cluster", "--route-table", "254"], "253-255"),
        (["--node", "n", "--in-cluster", "--ready-port", "0"], "--ready-port 0"),
        (["--node", "a/b", "--in-cluster"], "node name"),
        (["--node", "n", "--in-cluster", "--drain-seconds", "-1"], "--drain-seconds"),
    ],
)
def test_bad_flags_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_uninstall_needs_no_state_source() -> None:
    assert parse("--node", "n", "--uninstall").pin_dir == Path("/sys/fs/bpf/nodemesh/n")
