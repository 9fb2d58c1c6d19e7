"""The lab's Prometheus: a real server scraping every agent, the central view's store.

Why the switch namespace: it holds the bridge every node (and the CA) is attached to, so an
address on the bridge itself (``PROMETHEUS_IP``, free: nodes use .2-.251, the CA .254) reaches
every node's ``:15020`` without a namespace or veth of its own, and nothing is added to the host.
``lab down`` removes it with the rest: the process lives in a lab namespace (and its PID is
recorded), its configuration and TSDB live under the lab's state directory.

The CA is a target too (job ``nodemesh-ca``: its ``/metrics`` on 15014 in its namespace).
Retention is short (``RETENTION``) and the scrape interval small, because a lab lives minutes
and its tests look at the last seconds.

Debian's ``prometheus`` package provides the binary (scripts/debian-packages.txt). Without it
the lab still comes up, without a central view, and says how to install it.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import yaml

from agent.base.constants import CA_METRICS_PORT, METRICS_PORT
from agent.lab import build, components, netns
from agent.lab.record import LabDir, write_atomic
from agent.lab.topology import SEGMENT, LabPlan

log = logging.getLogger(__name__)

NAME = "prometheus"
PROMETHEUS_IP = str(SEGMENT[253])
PORT = 9090
RETENTION = "2h"
SCRAPE_INTERVAL = "2s"
AGENT_JOB = "nodemesh-agent"
CA_JOB = "nodemesh-ca"
BINARY = "prometheus"


def url(plan: LabPlan) -> str:
    """Where the lab's Prometheus answers (from the switch namespace or any node's)."""
    del plan  # the same address in every lab: each lab has its own segment
    return f"http://{PROMETHEUS_IP}:{PORT}"


def scrape_config(plan: LabPlan) -> dict[str, Any]:
    """The server's configuration: one static target per agent, labelled with its node."""
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": AGENT_JOB,
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [f"{node.ip}:{METRICS_PORT}"], "labels": {"node": node.name}}
                    for node in plan.nodes
                ],
            },
            {
                "job_name": CA_JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"{plan.ca_ip}:{CA_METRICS_PORT}"]}],
            },
        ],
    }


def command(plan: LabPlan, labdir: LabDir) -> tuple[str, ...]:
    binary = shutil.which(BINARY) or BINARY
    return (
        binary,
        f"--config.file={labdir.path / 'prometheus.yml'}",
        f"--storage.tsdb.path={labdir.path / 'prometheus'}",
        f"--storage.tsdb.retention.time={RETENTION}",
        f"--web.listen-address={PROMETHEUS_IP}:{PORT}",
        "--log.level=warn",
    )


def _ready(plan: LabPlan) -> bool:
    try:
        status, _ = netns.http_get(plan.switch_netns, PROMETHEUS_IP, PORT, "/-/ready", timeout=1.0)
    except OSError:
        return False
    return status == 200


def start(plan: LabPlan, labdir: LabDir, *, timeout: float) -> bool:
    """Start the lab's Prometheus and wait until it is ready; False (with a warning saying how
    to install it) when the binary is missing."""
    if shutil.which(BINARY) is None:
        log.warning(
            "lab %s: no `prometheus` binary, so the lab has no central view (nodemesh stat "
            "falls back to the agents); install it with scripts/setup.sh (Debian package "
            "prometheus)",
            plan.lab,
        )
        return False
    write_atomic(labdir.path / "prometheus.yml", yaml.safe_dump(scrape_config(plan)))
    (labdir.path / "prometheus").mkdir(mode=0o700, exist_ok=True)
    build.address_on_bridge(plan, PROMETHEUS_IP)
    component = components.Component(
        NAME, plan.switch_netns, command(plan, labdir), lambda: _ready(plan)
    )
    proc = components.start(component, labdir)
    components.wait_ready(component, proc, labdir, timeout=timeout)
    return True


def status(plan: LabPlan, labdir: LabDir) -> dict[str, Any]:
    """The ``prometheus`` entry of ``lab status --json``."""
    return {
        "netns": plan.switch_netns,
        "url": url(plan),
        "state": components.process_state(labdir, NAME),
        "dataDir": str(labdir.path / "prometheus"),
    }
