"""`nodemesh agent` flags: defaults of contract 2 and errors that name the flag."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError, add_arguments, from_args
from agent.proxy.h2wire import HboneSettings
from agent.wiring import node_proxy
from tests.integration.proxy.mesh import FakeIdentities, TestCA, make_store

# a CA given whole (address, root, token): what --cert-ttl needs
CA = ["--node", "n", "--in-cluster", "--ca-address", "ca:15012", "--ca-root", "r"]
CA += ["--token-file", "t"]


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
        (["--node", "n", "--in-cluster", "--cert-ttl", "12h"], "no CA is set"),
        (["--node", "n", "--cluster-file", "c.yaml", "--trust-domain", "a.org"], "trustDomain"),
        (["--node", "n", "--in-cluster", "--trust-domain", "Example.org"], "lowercase DNS name"),
        (["--node", "n", "--in-cluster", "--trust-domain", "a.org/ns"], "lowercase DNS name"),
        ([*CA, "--cert-ttl", "0s"], "leave --cert-ttl out"),
        (["--node", "n", "--in-cluster", "--hbone-window", "32MiB"], "64KiB to 16MiB"),
        (["--node", "n", "--in-cluster", "--hbone-window", "1000"], "64KiB to 16MiB"),
        (["--node", "n", "--in-cluster", "--hbone-window", "1.5MiB"], "such as 512KiB"),
        (["--node", "n", "--in-cluster", "--hbone-window", "4GB"], "such as 512KiB"),
        (["--node", "n", "--in-cluster", "--hbone-window", "MiB"], "such as 512KiB"),
    ],
)
def test_bad_flags_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


@pytest.mark.parametrize("flag", ["--capture-mark", "--route-table"])
def test_a_mark_or_table_that_is_no_number_is_named_without_internals(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="nodemesh agent")
    add_arguments(parser)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--node", "n", "--in-cluster", flag, "zz"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (
        f"nodemesh agent: error: argument {flag}: 'zz' is not a number: "
        "write it in decimal or as 0x-hex, e.g. 0x1539"
    )


def test_uninstall_needs_no_state_source() -> None:
    assert parse("--node", "n", "--uninstall").pin_dir == Path("/sys/fs/bpf/nodemesh/n")


@pytest.mark.parametrize(
    ("text", "size"),
    [("4MiB", 4 << 20), ("4m", 4 << 20), ("256KiB", 256 << 10), ("256K", 256 << 10),
     ("65536", 65536), ("16MiB", 16 << 20)],
)  # fmt: skip
def test_hbone_window_sizes(text: str, size: int) -> None:
    assert parse("--node", "n", "--in-cluster", "--hbone-window", text).hbone_window == size


def test_hbone_window_defaults_to_the_proxys_and_reaches_it() -> None:
    cfg = parse("--node", "n", "--in-cluster")
    assert cfg.hbone_window == HboneSettings().stream_window
    chosen = parse("--node", "n", "--in-cluster", "--hbone-window", "1MiB")
    settings = node_proxy(chosen, make_store(), FakeIdentities(TestCA())).proxy.core.settings
    assert (settings.hbone.stream_window, settings.hbone.connection_window) == (1 << 20, 4 << 20)


@pytest.mark.parametrize(
    ("text", "size"),
    [("256MiB", 256 << 20), ("1GiB", 1 << 30), ("1g", 1 << 30), ("16M", 16 << 20),
     ("64GiB", 64 << 30)],
)  # fmt: skip
def test_hbone_buffer_budget_sizes(text: str, size: int) -> None:
    cfg = parse("--node", "n", "--in-cluster", "--hbone-buffer-budget", text)
    assert cfg.hbone_buffer_budget == size


@pytest.mark.parametrize(
    ("text", "message"),
    [("8MiB", "16MiB to 64GiB"), ("65GiB", "16MiB to 64GiB"), ("lots", "such as 256MiB"),
     ("1.5GiB", "such as 256MiB")],
)  # fmt: skip
def test_a_bad_hbone_buffer_budget_names_the_flag_and_the_range(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse("--node", "n", "--in-cluster", "--hbone-buffer-budget", text)
    assert str(e.value).startswith(f"--hbone-buffer-budget {text}: expected")
    assert message in str(e.value)


def test_the_hbone_buffer_budget_reaches_the_proxy_split_among_the_workers() -> None:
    cfg = parse("--node", "n", "--in-cluster")
    assert cfg.hbone_buffer_budget == 256 << 20
    proxy = node_proxy(cfg, make_store(), FakeIdentities(TestCA())).proxy
    assert proxy.core.hbone_budget.limit == 256 << 20
    four = AgentConfig(node="n", pin_dir=Path("/tmp/x"), workers=4, hbone_buffer_budget=1 << 30)
    proxy = node_proxy(four, make_store(), FakeIdentities(TestCA())).proxy
    assert proxy.core.hbone_budget.limit == 256 << 20  # each worker's quarter


def test_config_dump_shows_the_budget_and_each_processs_share() -> None:
    from agent.wiring import effective_config

    two = AgentConfig(node="n", pin_dir=Path("/tmp/x"), workers=2, hbone_buffer_budget=1 << 30)
    shown = effective_config(two)
    assert (shown["hbone_buffer_budget"], shown["hbone_buffer_budget_per_process"]) == (
        1 << 30,
        1 << 29,
    )


@pytest.mark.parametrize(
    ("text", "size"),
    [("64MiB", 64 << 20), ("2MiB", 2 << 20), ("1g", 1 << 30), ("64GiB", 64 << 30)],
)
def test_hbone_queue_budget_sizes(text: str, size: int) -> None:
    cfg = parse("--node", "n", "--in-cluster", "--hbone-queue-budget", text)
    assert cfg.hbone_queue_budget == size


@pytest.mark.parametrize(
    ("text", "message"),
    [("1MiB", "2MiB to 64GiB"), ("65GiB", "2MiB to 64GiB"), ("lots", "such as 64MiB")],
)
def test_a_bad_hbone_queue_budget_names_the_flag_and_the_range(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse("--node", "n", "--in-cluster", "--hbone-queue-budget", text)
    assert str(e.value).startswith(f"--hbone-queue-budget {text}: expected")
    assert message in str(e.value)


def test_the_hbone_queue_budget_reaches_the_proxy_split_among_the_workers() -> None:
    from agent.wiring import effective_config

    cfg = parse("--node", "n", "--in-cluster")
    assert cfg.hbone_queue_budget == 64 << 20
    proxy = node_proxy(cfg, make_store(), FakeIdentities(TestCA())).proxy
    assert proxy.core.hbone_budget.queue.limit == 64 << 20
    four = AgentConfig(node="n", pin_dir=Path("/tmp/x"), workers=4, hbone_queue_budget=1 << 30)
    proxy = node_proxy(four, make_store(), FakeIdentities(TestCA())).proxy
    assert proxy.core.hbone_budget.queue.limit == 256 << 20  # each worker's quarter
    shown = effective_config(four)
    assert (shown["hbone_queue_budget"], shown["hbone_queue_budget_per_process"]) == (
        1 << 30,
        256 << 20,
    )


def test_connection_caps_default_to_the_descriptor_limit_and_half_of_it_per_pod() -> None:
    cfg = parse("--node", "n", "--in-cluster")
    assert (cfg.max_connections, cfg.max_connections_per_pod) == (None, None)
    assert cfg.connection_cap(65536) == 28160  # (65,536 - 9,216 reserve) / 2 descriptors
    assert cfg.per_pod_cap(28160) == 14080  # a pod never takes the others' half
    assert cfg.connection_cap(1 << 20) == 458240 and cfg.per_pod_cap(458240) == 229120
    assert cfg.connection_cap(1024) == 256 and cfg.per_pod_cap(1) == 1
    assert parse("--node", "n", "--in-cluster", "--max-connections-per-pod", "auto") == cfg


def test_connection_caps_are_taken_as_given_within_the_descriptor_limit() -> None:
    argv = ("--node", "n", "--in-cluster", "--max-connections", "1000")
    cfg = parse(*argv, "--max-connections-per-pod", "50")
    assert (cfg.connection_cap(65536), cfg.per_pod_cap(1000)) == (1000, 50)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-connections", "0"], "--max-connections 0: expected a number of connections"),
        (["--max-connections", "many"], "--max-connections many: expected a number"),
        (["--max-connections-per-pod", "0"], "--max-connections-per-pod 0: expected a number"),
        (["--max-connections-per-pod", "x"], r"--max-connections-per-pod x: .*or auto \(half"),
    ],
)
def test_bad_connection_caps_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse("--node", "n", "--in-cluster", *argv)


def test_a_cap_past_what_the_descriptor_limit_leaves_names_the_limit_and_the_fix() -> None:
    cfg = parse("--node", "n", "--in-cluster", "--max-connections", "30000")
    with pytest.raises(ConfigError) as caught:
        cfg.connection_cap(65536)
    text = str(caught.value)
    assert "at most 28160" in text and "RLIMIT_NOFILE 65536" in text
    assert "LimitNOFILE" in text and "lower --max-connections" in text


def test_the_header_field_count_defaults_to_envoys_reaches_the_proxy_and_the_dump() -> None:
    from agent.wiring import effective_config

    assert parse("--node", "n", "--in-cluster").max_header_fields == 100
    cfg = parse("--node", "n", "--in-cluster", "--max-header-fields", "250")
    proxy = node_proxy(cfg, make_store(), FakeIdentities(TestCA())).proxy
    assert proxy.core.settings.max_header_fields == 250
    assert effective_config(cfg)["max_header_fields"] == 250
    assert parse("--node", "n", "--in-cluster", "--max-header-fields", "10").max_header_fields == 10


@pytest.mark.parametrize("text", ["0", "9", "12289", "many", "-5", "1e3"])
def test_a_bad_header_field_count_names_the_flag_the_range_and_why(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse("--node", "n", "--in-cluster", "--max-header-fields", text)
    assert str(e.value).startswith(f"--max-header-fields {text}: expected 10 to 12288 header")
    why = str(e.value)  # the client's own fields come near 10, the proxies' are not counted
    assert "Host, User-Agent" in why and "not counted" in why and "60 KiB" in why


def test_a_kubernetes_sources_trust_domain_is_the_flags_and_reaches_the_agents_state(
    tmp_path: Path,
) -> None:
    """The CA signs in its own trust domain and refuses requests for another: an agent on a
    Kubernetes source must be able to name it, and its state (what it asks the CA for, what
    policy principals are compared with) must carry it."""
    from agent.app import Agent

    assert parse("--node", "n", "--in-cluster").trust_domain == "cluster.local"
    config = parse("--node", "n", "--in-cluster", "--trust-domain", "example.org")
    assert config.trust_domain == "example.org"
    config = dataclasses.replace(config, pin_dir=tmp_path / "pins")
    assert Agent(config).store.snapshot().trust_domain == "example.org"
