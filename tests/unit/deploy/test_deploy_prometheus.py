"""daemonset/prometheus/scrape-config.yaml: valid for Prometheus, and it finds the agents.

Two checks. ``promtool check config`` (Debian's prometheus package, scripts/setup.sh) validates
the job as Prometheus would load it, except for its Kubernetes discovery block: Debian builds
Prometheus without Kubernetes discovery, so for promtool that block is swapped for a static
target, and its fields are checked here against Prometheus's documented ones. Then the job's
pod selection and relabelling are applied, the way Prometheus applies them, to the agent pod
the rendered DaemonSet creates: the result
must be one target at the pod's IP on the agent's real ``--metrics-port`` and path, so the file
cannot drift from the manifests' namespace, labels or annotations.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.unit.deploy.manifests import REPO, find, flags, pod_spec, render

SCRAPE_CONFIG = REPO / "daemonset" / "prometheus" / "scrape-config.yaml"
POD_IP = "192.0.2.10"


def jobs() -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    return loaded


def test_promtool_accepts_the_job(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run scripts/setup.sh (Debian package prometheus)"
    config = tmp_path / "prometheus.yml"
    checked = [
        {k: v for k, v in job.items() if k != "kubernetes_sd_configs"}
        | {"static_configs": [{"targets": [f"{POD_IP}:15020"]}]}
        for job in jobs()
    ]
    config.write_text(yaml.safe_dump({"scrape_configs": checked}), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Fields of kubernetes_sd_config (prometheus.io/docs/prometheus/latest/configuration/configuration).
SD_FIELDS = {
    "api_server", "role", "kubeconfig_file", "namespaces", "selectors", "attach_metadata",
    "basic_auth", "authorization", "oauth2", "proxy_url", "tls_config", "follow_redirects",
}  # fmt: skip


def test_the_discovery_block_uses_known_fields() -> None:
    for job in jobs():
        for sd in job["kubernetes_sd_configs"]:
            assert set(sd) <= SD_FIELDS, set(sd) - SD_FIELDS
            assert sd["role"] in {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
            assert set(sd["namespaces"]) <= {"own_namespace", "names"}
            for selector in sd["selectors"]:
                assert set(selector) <= {"role", "label", "field"}
                assert selector["role"] == sd["role"]


def _meta(pod: dict[str, Any]) -> dict[str, str]:
    """The ``__meta_kubernetes_pod_*`` labels Prometheus's pod discovery gives ``pod``."""
    meta = {
        "__address__": POD_IP,  # the agent declares no container ports: the bare pod IP
        "__metrics_path__": "/metrics",
        "__meta_kubernetes_namespace": pod["metadata"]["namespace"],
        "__meta_kubernetes_pod_name": "nodemesh-agent-x7k2p",
        "__meta_kubernetes_pod_ip": POD_IP,
        "__meta_kubernetes_pod_node_name": "node-a",
    }
    for key, value in pod["metadata"].get("annotations", {}).items():
        meta["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    return meta


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus's ``keep`` and ``replace`` actions (the only ones the job uses)."""
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                replacement = re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1"))
                labels[rule["target_label"]] = match.expand(replacement)
        else:
            raise AssertionError(f"the test does not model relabel action {action!r}")
    return labels


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    template = workload["spec"]["template"]
    return {
        "metadata": {
            "namespace": workload["metadata"]["namespace"],
            "labels": template["metadata"]["labels"],
            "annotations": template["metadata"].get("annotations", {}),
        }
    }


def _job(name: str) -> dict[str, Any]:
    return next(job for job in jobs() if job["job_name"] == name)


def _selected(job: dict[str, Any], pod: dict[str, Any]) -> dict[str, str]:
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod"
    assert pod["metadata"]["namespace"] in sd["namespaces"]["names"]
    (selector,) = sd["selectors"]
    key, _, value = selector["label"].partition("=")
    assert pod["metadata"]["labels"].get(key) == value
    target = _relabel(_meta(pod), job["relabel_configs"])
    assert target is not None, f"job {job['job_name']} drops its pod"
    return target


def test_the_ca_job_selects_the_ca_pods_and_scrapes_their_metrics_listener() -> None:
    deployment = find(render("daemonset"), "Deployment", "nodemesh-ca")
    target = _selected(_job("nodemesh-ca"), _pod(deployment))
    ca = next(c for c in pod_spec(deployment)["containers"] if c["name"] == "ca")
    port = flags(ca)["--metrics-listen"].rpartition(":")[2]
    assert target["__address__"] == f"{POD_IP}:{port}"
    assert target["__metrics_path__"] == "/metrics"
    assert {"name": "http-monitoring", "containerPort": int(port), "protocol": "TCP"} in ca["ports"]


def test_the_job_selects_the_agent_pods_and_scrapes_their_metrics_port() -> None:
    daemonset = find(render("daemonset"), "DaemonSet", "nodemesh-agent")
    target = _selected(_job("nodemesh-agent"), _pod(daemonset))
    agent = next(c for c in pod_spec(daemonset)["containers"] if c["name"] == "agent")
    assert target["__address__"] == f"{POD_IP}:{flags(agent)['--metrics-port']}"
    assert target["__metrics_path__"] == "/metrics"
    assert target["node"] == "node-a"


def test_a_pod_without_the_scrape_annotation_is_not_a_target() -> None:
    pod = {"metadata": {"namespace": "nodemesh-system", "annotations": {}}}
    for job in jobs():
        assert _relabel(_meta(pod), job["relabel_configs"]) is None
