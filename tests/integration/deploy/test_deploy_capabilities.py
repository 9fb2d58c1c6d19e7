"""The agent starts with exactly the capabilities its DaemonSet grants, and no fewer suffice.

Kubernetes gives the agent's container (UID 0) a bounding set of the listed capabilities; the
test reproduces that with ``setpriv --bounding-set`` and runs the real ``nodemesh agent`` in a
lab node's network namespace (setns of net only, like the lab), reading the list from the
rendered DaemonSet. Started this way the agent compiles and pins its programs, attaches them to
the uplink and to the meshed pod's veth, installs its rule and route, opens its transparent
listeners and reports ready; SIGTERM drains it and it exits 0. The control run without
CAP_NET_ADMIN must fail to start, so the test can tell a sufficient set from an insufficient one.
AppArmor, SELinux and seccomp profiles of a real container runtime are not reproduced here.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.lab.handle import Lab
from tests.unit.deploy.manifests import REPO, find, pod_spec, render

pytestmark = [pytest.mark.root, pytest.mark.lab]

TOPOLOGY = """\
nodes:
  - name: node1
    pods:
      - {name: app, namespace: default, serviceAccount: app, labels: {app: app},
         annotations: {nodemesh.io/mesh: enabled}}
"""
READY_ATTEMPTS = 120  # polls, half a second apart: BCC compiles at start-up


def daemonset_capabilities() -> list[str]:
    agent = pod_spec(find(render("daemonset"), "DaemonSet", "nodemesh-agent"))["containers"][0]
    added: list[str] = agent["securityContext"]["capabilities"]["add"]
    return added


def bounding_set(capabilities: list[str]) -> str:
    return "-all," + ",".join(f"+{c.lower()}" for c in capabilities)


@pytest.fixture
def node_lab(lab_factory: Callable[..., Lab]) -> Lab:
    return lab_factory(topology=TOPOLOGY, components=False)


@pytest.fixture
def pin_dir(node_lab: Lab) -> Iterator[Path]:
    path = Path(f"/sys/fs/bpf/nodemesh-deploytest-{secrets.token_hex(3)}")
    try:
        yield path
    finally:
        node_lab.exec(
            "node1",
            *(sys.executable, "-m", "agent", "agent", "--uninstall", "--node", "node1"),
            *("--pin-dir", str(path)),
            capture_output=True,
            check=False,
        )
        subprocess.run(["rm", "-rf", str(path)], check=False)


def start_agent(lab: Lab, pin_dir: Path, capabilities: list[str]) -> subprocess.Popen[str]:
    return lab.popen(
        "node1",
        *("setpriv", "--inh-caps=-all", f"--bounding-set={bounding_set(capabilities)}"),
        *(sys.executable, "-m", "agent", "agent", "--node", "node1"),
        *("--cluster-file", str(Path(lab.state_dir) / "cluster.yaml"), "--pin-dir", str(pin_dir)),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def ready(lab: Lab, agent: subprocess.Popen[str]) -> bool:
    """Poll readiness until 200 or the agent exits; True when it became ready."""
    url = f"http://{lab.node('node1')['ip']}:15021/healthz/ready"
    probe = f"import urllib.request as u; u.urlopen({url!r}, timeout=2)"
    for _ in range(READY_ATTEMPTS):
        if agent.poll() is not None:
            return False
        if lab.exec("node1", sys.executable, "-c", probe, capture_output=True).returncode == 0:
            return True
        time.sleep(0.5)
    return False


def stop(agent: subprocess.Popen[str]) -> tuple[int, str]:
    if agent.poll() is None:
        agent.terminate()
    try:
        output, _ = agent.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        agent.kill()
        output, _ = agent.communicate()
    return agent.returncode, output


def tc_ingress_filters(lab: Lab, device: str) -> list[dict[str, object]]:
    shown = lab.exec(
        "node1",
        *("tc", "-json", "filter", "show", "dev", device, "ingress"),
        capture_output=True,
        text=True,
        check=True,
    )
    filters: list[dict[str, object]] = json.loads(shown.stdout or "[]")
    return filters


def test_agent_runs_with_exactly_the_daemonset_capabilities(node_lab: Lab, pin_dir: Path) -> None:
    capabilities = daemonset_capabilities()
    assert "SYS_ADMIN" not in capabilities
    agent = start_agent(node_lab, pin_dir, capabilities)
    try:
        became_ready = ready(node_lab, agent)
        veth = node_lab.pod("default/app")["hostVeth"]
        uplink = node_lab.node("node1")["uplink"]
        attached = (
            {d: tc_ingress_filters(node_lab, d) for d in (veth, uplink)} if became_ready else {}
        )
    finally:
        code, output = stop(agent)
    assert became_ready, f"agent with {capabilities} never became ready:\n{output}"
    for device, filters in attached.items():
        assert any(f.get("kind") == "bpf" for f in filters), f"no BPF filter on {device}"
    assert code == 0, f"agent did not drain and exit 0 on SIGTERM:\n{output}"
    assert any(pin_dir.iterdir()), "the agent pinned nothing"


def test_agent_cannot_start_without_net_admin(node_lab: Lab, pin_dir: Path) -> None:
    fewer = [c for c in daemonset_capabilities() if c != "NET_ADMIN"]
    agent = start_agent(node_lab, pin_dir, fewer)
    try:
        became_ready = ready(node_lab, agent)
    finally:
        code, output = stop(agent)
    assert not became_ready and code != 0, f"agent started with {fewer}:\n{output}"
