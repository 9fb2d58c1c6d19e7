"""Operational facts of the agent DaemonSet and the CA Deployment that a cluster relies on:
they run everywhere they must, survive disruptions, drain within their grace period, are probed
on ports they declare, and are started with flags the real CLI accepts.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.base import cpus
from tests.unit.deploy.manifests import REPO, Obj, expand, find, flags, pod_spec, render, tool

# Time the agent needs after its drain deadline to close listeners and exit, and for the preStop
# hook to run: the grace period must cover drain plus this margin.
SHUTDOWN_MARGIN_SECONDS = 10


def agent() -> Obj:
    return find(render("daemonset"), "DaemonSet", "nodemesh-agent")


def ca() -> Obj:
    return find(render("daemonset"), "Deployment", "nodemesh-ca")


def named_ports(container: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def probe_port(container: Obj, probe: str) -> int:
    handler = container[probe]
    port = (handler.get("httpGet") or handler.get("tcpSocket"))["port"]
    return named_ports(container)[port] if isinstance(port, str) else int(port)


def substitute_env(args: list[str], container: Obj) -> list[str]:
    """Expand args like the kubelet, with a sample value for downward-API variables."""
    env = {e["name"]: "node1" for e in container.get("env", [])}
    return [expand(arg, env) for arg in args]


def test_agent_runs_on_every_node_in_the_host_network() -> None:
    spec = pod_spec(agent())
    assert spec["hostNetwork"] is True
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"
    node_name = spec["containers"][0]["env"][0]
    assert node_name == {
        "name": "NODE_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
    }


def test_mesh_pods_are_scheduled_on_linux_nodes_only() -> None:
    # The image and the datapath are Linux's: on a cluster with Windows nodes, a pod there
    # would never start, and an agent DaemonSet tolerating every taint would try every node.
    for workload in (agent(), ca()):
        assert pod_spec(workload).get("nodeSelector") == {"kubernetes.io/os": "linux"}


def test_agent_upgrades_one_node_at_a_time_by_surge() -> None:
    strategy = agent()["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    # The new agent starts beside the old one and takes the node over (agent.handover); the
    # node is never without an agent.
    assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_the_surge_pod_is_not_probed_before_its_agent_announced_itself() -> None:
    # The old agent answers the shared readiness port until the takeover; it defers its drain
    # only for a successor that has connected to it (agent.handover), about 1 s after start.
    container = pod_spec(agent())["containers"][0]
    assert container["readinessProbe"]["initialDelaySeconds"] >= 5


def host_ports(spec: Obj) -> list[int]:
    """The host ports a pod claims, as the scheduler's NodePorts filter counts them: explicit
    hostPorts, and in the host network every declared containerPort."""
    containers = spec["containers"] + spec.get("initContainers", [])
    ports = [p for c in containers for p in c.get("ports", [])]
    if spec.get("hostNetwork"):
        return [int(p.get("hostPort", p["containerPort"])) for p in ports]
    return [int(p["hostPort"]) for p in ports if "hostPort" in p]


def test_the_surge_pod_fits_on_a_node_beside_the_old_agent() -> None:
    # Two pods of this template on one node must not claim a common host port, or the
    # scheduler leaves the surge pod Pending and the rollout never progresses.
    assert host_ports(pod_spec(agent())) == []


def test_host_ports_count_container_ports_in_the_host_network() -> None:
    declared = {"containers": [{"ports": [{"containerPort": 15021}]}]}
    assert host_ports(declared | {"hostNetwork": True}) == [15021]
    assert host_ports(declared) == []


def test_grace_period_covers_the_drain_deadline() -> None:
    container = pod_spec(agent())["containers"][0]
    drain = int(flags(container)["--drain-seconds"])
    grace = pod_spec(agent())["terminationGracePeriodSeconds"]
    assert grace >= drain + SHUTDOWN_MARGIN_SECONDS, (grace, drain)


def test_probes_use_declared_ports() -> None:
    container = pod_spec(agent())["containers"][0]
    ready = int(flags(container)["--ready-port"])
    assert probe_port(container, "readinessProbe") == ready
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
    assert probe_port(container, "livenessProbe") == ready
    ca_container = pod_spec(ca())["containers"][0]
    listen = int(flags(ca_container)["--listen"].rsplit(":", 1)[1])
    assert probe_port(ca_container, "readinessProbe") == listen
    assert probe_port(ca_container, "livenessProbe") == listen


def test_prometheus_annotations_point_at_the_metrics_port() -> None:
    annotations = agent()["spec"]["template"]["metadata"]["annotations"]
    container = pod_spec(agent())["containers"][0]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == int(flags(container)["--metrics-port"])


def test_ca_survives_a_node_loss_and_voluntary_disruptions() -> None:
    spec = ca()["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = find(render("daemonset"), "PodDisruptionBudget", "nodemesh-ca")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == spec["selector"]
    service = find(render("daemonset"), "Service", "nodemesh-ca")
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]


def test_every_container_has_requests_and_limits() -> None:
    for directory in ("daemonset", "daemonset/samples"):
        for obj in render(directory):
            if obj["kind"] in ("Deployment", "DaemonSet"):
                for container in pod_spec(obj)["containers"]:
                    resources = container["resources"]
                    for kind in ("requests", "limits"):
                        assert {"cpu", "memory"} <= set(resources[kind]), obj["metadata"]["name"]


@pytest.mark.parametrize(
    ("kind", "name", "module"),
    [("DaemonSet", "nodemesh-agent", "agent.app"), ("Deployment", "nodemesh-ca", "agent.ca.cli")],
)
def test_the_command_accepts_the_manifest_arguments(kind: str, name: str, module: str) -> None:
    # Parsed by the subcommand's own parser (the module that registers it), so a renamed or
    # removed flag fails here before a cluster sees a crash-looping pod.
    container = pod_spec(find(render("daemonset"), kind, name))["containers"][0]
    args = substitute_env(container["args"], container)
    parser = argparse.ArgumentParser(prog="nodemesh", exit_on_error=False)
    importlib.import_module(module).register(parser.add_subparsers(dest="command"))
    try:
        parsed = parser.parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"nodemesh rejects {kind}/{name} args: {shlex.join(args)}") from e
    assert parsed.command == args[0]


def kernel_headers_check(modules: Path) -> subprocess.CompletedProcess[str]:
    """The agent pod's init container script as the kubelet would run it, with the host's
    /lib/modules replaced by ``modules``."""
    init = pod_spec(agent())["initContainers"][0]
    assert init["name"] == "kernel-headers"
    env = {"NODE_NAME": "node1"}
    command = [expand(a, env) for a in init["command"] + init["args"]]
    command[-1] = command[-1].replace("/lib/modules", str(modules))
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_kernel_headers_check_passes_when_the_headers_exist(tmp_path: Path) -> None:
    (tmp_path / platform.release() / "build" / "include").mkdir(parents=True)
    result = kernel_headers_check(tmp_path)
    assert result.returncode == 0, result.stderr


def test_kernel_headers_check_names_the_node_and_the_fix(tmp_path: Path) -> None:
    result = kernel_headers_check(tmp_path)
    assert result.returncode == 1
    release = platform.release()
    assert f"node node1 has no kernel headers for {release}" in result.stderr
    assert f"apt-get install linux-headers-{release}" in result.stderr


def readme_uninstall_command() -> list[str]:
    """README's per-node clean-up (Install on a cluster, Uninstall), NODE as node1."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"`(kubectl debug node/NODE[^`]*)`", readme)
    assert match, "README has no kubectl debug node/NODE command"
    return shlex.split(match.group(1).replace("\n", " ").replace("NODE", "node1"))


def test_the_uninstall_debug_container_can_use_its_capabilities() -> None:
    # `kubectl debug --profile=sysadmin` makes the container privileged but keeps the image's
    # user, and a non-root process gets no capabilities (none ambient), privileged or not: the
    # kernel would refuse every netlink and bpffs change of `--uninstall`. The command must run
    # it as root, as agent.yaml runs the agent.
    command = readme_uninstall_command()
    options = dict(a.partition("=")[::2] for a in command[: command.index("--")] if "=" in a)
    image_user = re.findall(r"^USER (\S+)", (REPO / "Dockerfile").read_text(), re.M)[-1]
    custom = options.get("--custom")
    user = image_user.partition(":")[0]
    if custom:
        patch = yaml.safe_load((REPO / custom).read_text())
        user = str(patch.get("securityContext", {}).get("runAsUser", user))
    assert options.get("--profile") == "sysadmin"
    assert user == "0", f"the debug container runs as uid {user}: add --custom with runAsUser 0"
    assert pod_spec(agent())["containers"][0]["securityContext"]["runAsUser"] == 0


def test_the_uninstall_command_matches_the_agent_it_cleans_up() -> None:
    command = readme_uninstall_command()
    args = command[command.index("--") + 1 :]
    assert args[0] == "nodemesh"
    parser = argparse.ArgumentParser(prog="nodemesh", exit_on_error=False)
    importlib.import_module("agent.app").register(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(args[1:])
    assert parsed.uninstall
    container = pod_spec(agent())["containers"][0]
    pin_dir = flags(dict(container, args=substitute_env(container["args"], container)))["--pin-dir"]
    # kubectl debug node mounts the node's root at /host.
    assert str(parsed.pin_dir) == "/host" + pin_dir
    assert parsed.node == "node1"


def test_workers_auto_sees_the_agents_cpu_limit(tmp_path: Path) -> None:
    # `--workers auto` sizes the proxy by the cgroup quota it reads under /sys/fs/cgroup. On a
    # cgroup v2 node the container has its own cgroup namespace (/proc/self/cgroup: "0::/"),
    # and the runtime mounts the container's cgroup there, whose cpu.max is the CPU limit. A
    # hostPath of the node's /sys/fs/cgroup mounted over it shows the node's root cgroup
    # instead, which has no cpu.max: every CPU of the node would get a worker.
    container = pod_spec(agent())["containers"][0]
    limit = math.ceil(float(container["resources"]["limits"]["cpu"]))
    node_root = tmp_path / "node"
    own = node_root / "kubepods.slice" / "pod-x" / "cri-containerd-agent.scope"
    own.mkdir(parents=True)
    (own / "cpu.max").write_text(f"{limit * 100000} 100000\n")
    volumes = {v["name"]: v for v in pod_spec(agent()).get("volumes", [])}
    mounted = [
        volumes[m["name"]] for m in container.get("volumeMounts", [])
        if m["mountPath"] == str(cpus.CGROUP_ROOT)
    ]  # fmt: skip
    seen = node_root if any("hostPath" in v for v in mounted) else own
    node_cpus = 32
    assert cpus.usable_cpus(node_cpus, *cpus.cgroup_quotas("0::/\n", seen)) == limit


def test_readmes_traces_overlay_gives_the_agent_its_otlp_endpoint(tmp_path: Path) -> None:
    # README, "Traces (OTLP)": the overlay an operator copies must render and start the agent
    # with --otlp-endpoint, parsed by the agent's own parser.
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n(# overlay/kustomization.yaml.*?)```", readme, re.S)
    assert block, "README's traces overlay is missing"
    (tmp_path / "nodemesh").symlink_to(REPO)
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text(block.group(1))
    rendered = subprocess.run(
        [str(tool("kubectl")), "kustomize", str(tmp_path / "overlay")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    ds = next(o for o in yaml.safe_load_all(rendered) if o and o["kind"] == "DaemonSet")
    container = pod_spec(ds)["containers"][0]
    parser = argparse.ArgumentParser(prog="nodemesh", exit_on_error=False)
    importlib.import_module("agent.app").register(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(substitute_env(container["args"], container))
    assert parsed.otlp_endpoint == "http://otel-collector.observability:4318"
