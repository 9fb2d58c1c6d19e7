"""Loop protection follows the configuration: the proxy refuses to connect to the ports this
agent listens on, as the flags set them, not as the defaults had them."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.app import mesh_components
from agent.config import AgentConfig, add_arguments, from_args
from agent.state import StateStore


def parse(*argv: str) -> AgentConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)))


def test_proxy_ports_are_the_ports_the_agent_listens_on(tmp_path: Path) -> None:
    config = parse(
        "--node", "node1", "--cluster-file", str(tmp_path / "cluster.yaml"),
        "--ca-address", "10.0.0.1:15012", "--ca-root", str(tmp_path / "root.pem"),
        "--token-file", str(tmp_path / "token"),
        "--metrics-port", "9090", "--ready-port", "9091", "--admin-address", "127.0.0.1:9000",
        "--workers", "1",  # the proxy in this process (the default is one per CPU)
    )  # fmt: skip
    _identity, proxy = mesh_components(config, StateStore())
    assert proxy is not None
    ports = proxy.proxy.core.settings.proxy_ports
    assert ports == {15001, 15006, 15008, 9000, 9090, 9091} == config.own_ports()
