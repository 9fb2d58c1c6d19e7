"""The lab's Prometheus: its configuration loads, targets every agent and the CA, and its address
is free."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from agent.base.constants import CA_METRICS_PORT, METRICS_PORT
from agent.lab import prometheus
from agent.lab.record import LabDir
from agent.lab.topology import CA_IP, DEFAULT_TOPOLOGY, SEGMENT, LabPlan, plan_lab
from agent.sources.document import parse_document


def default_plan() -> LabPlan:
    doc = parse_document(DEFAULT_TOPOLOGY, source="<default>")
    return plan_lab(doc, "t", source="<default>")[1]


def test_every_agent_is_a_target_labelled_with_its_node(tmp_path: Path) -> None:
    plan = default_plan()
    config = prometheus.scrape_config(plan)
    agents, ca = config["scrape_configs"]
    targets = {c["targets"][0]: c["labels"]["node"] for c in agents["static_configs"]}
    assert targets == {f"{n.ip}:{METRICS_PORT}": n.name for n in plan.nodes}
    assert ca["static_configs"] == [{"targets": [f"{CA_IP}:{CA_METRICS_PORT}"]}]
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run scripts/setup.sh (Debian package prometheus)"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_data_and_configuration_live_in_the_state_directory(tmp_path: Path) -> None:
    labdir = LabDir("t", str(tmp_path))
    argv = prometheus.command(default_plan(), labdir)
    assert f"--storage.tsdb.path={labdir.path / 'prometheus'}" in argv
    assert f"--config.file={labdir.path / 'prometheus.yml'}" in argv
    assert f"--storage.tsdb.retention.time={prometheus.RETENTION}" in argv


def test_the_address_is_on_the_segment_and_no_node_or_the_ca_can_have_it() -> None:
    nodes = [str(SEGMENT[i + 1]) for i in range(250)]  # the most nodes a lab plans
    assert prometheus.PROMETHEUS_IP not in [*nodes, CA_IP]
    assert prometheus.url(default_plan()) == f"http://{prometheus.PROMETHEUS_IP}:9090"
