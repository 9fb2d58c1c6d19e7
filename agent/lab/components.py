"""The mesh processes of a lab: one CA and one agent per node, each in its own namespace.

Each process enters only the network namespace of its node (``setns`` between fork and exec), so all
agents share the host's /sys/fs/bpf and each pins under its own directory. Readiness is what the
components promise: the CA accepts TLS on 15012; an agent answers 200 on
``:15021/healthz/ready``. A process that exits, or does not become ready in time, fails ``up``
with the path of its log and its last lines.
"""

from __future__ import annotations

import dataclasses
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.base.constants import CA_PORT, READY_PORT
from agent.handover import socket_name, who
from agent.lab import netns
from agent.lab.record import LabDir, write_atomic
from agent.lab.topology import LabError, LabPlan, NodePlan

# Every lab agent runs its proxy in one process, whatever the agent's default (one worker per
# CPU): the lab's nodes share the host's cores, two agents with a worker per core would only
# add processes and memory, and the tests measure single-process agents unless they restart
# one with ``--workers N`` (a later flag wins).
LAB_WORKERS = 1


@dataclass(frozen=True)
class Component:
    name: str  # "ca" or "agent-<node>": the log and pid file names
    netns: str
    argv: tuple[str, ...]
    ready: Callable[[], bool]


def _ca_ready(plan: LabPlan) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            sock = netns.connect(plan.ca_netns, plan.ca_ip, CA_PORT, timeout=1.0)
        except OSError:
            return False
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with ctx.wrap_socket(sock):
                return True
        except (OSError, ssl.SSLError):
            return False
        finally:
            sock.close()

    return probe


def agent_ready(node: NodePlan) -> bool:
    try:
        status, _ = netns.http_get(node.netns, node.ip, READY_PORT, "/healthz/ready", timeout=1.0)
    except OSError:
        return False
    return status == 200


def _write_tokens(labdir: LabDir, plan: LabPlan) -> None:
    """One random bearer token per node: the agent's file and the CA's table."""
    tokens = []
    for node in plan.nodes:
        token = secrets.token_urlsafe(32)
        write_atomic(labdir.token_file(node.name), token, mode=0o600)
        tokens.append({"node": node.name, "token": token})
    write_atomic(labdir.node_tokens_file, yaml.safe_dump({"tokens": tokens}), mode=0o600)


def plan_components(
    plan: LabPlan, labdir: LabDir, *, drain_seconds: float | None = None
) -> list[Component]:
    """The components of a lab, in start order (the CA before the agents).

    Pure: ``start_all`` writes the tokens the command lines refer to, so a component can be
    planned again later (to restart it) without replacing the credentials in use."""
    nodemesh = (sys.executable, "-m", "agent")
    ca_argv = (
        *nodemesh, "ca", "--listen", f"0.0.0.0:{CA_PORT}",
        "--cluster-file", str(labdir.cluster_file), "--root-dir", str(labdir.ca_dir),
        "--node-tokens", str(labdir.node_tokens_file), "--san", plan.ca_ip,
    )  # fmt: skip
    found = [Component("ca", plan.ca_netns, ca_argv, _ca_ready(plan))]
    for node in plan.nodes:
        argv: tuple[str, ...] = (
            *nodemesh, "agent", "--node", node.name,
            "--cluster-file", str(labdir.cluster_file), "--pin-dir", node.pin_dir,
            "--uplink", node.uplink,
            "--ca-address", f"{plan.ca_ip}:{CA_PORT}",
            "--ca-root", str(labdir.ca_dir / "root.pem"),
            "--token-file", str(labdir.token_file(node.name)),
            "--workers", str(LAB_WORKERS),
        )  # fmt: skip
        if drain_seconds is not None:
            argv += ("--drain-seconds", f"{drain_seconds:g}")
        found.append(Component(f"agent-{node.name}", node.netns, argv, _bind(node)))
    return found


def _bind(node: NodePlan) -> Callable[[], bool]:
    return lambda: agent_ready(node)


def agent_component(plan: LabPlan, labdir: LabDir, node: NodePlan) -> Component:
    """The running agent of ``node`` as it was started (its recorded command line)."""
    name = f"agent-{node.name}"
    argv = labdir.command(name)
    if argv is None:
        raise LabError(f"{name} was never started in lab {plan.lab}; run `nodemesh lab up`")
    return Component(name, node.netns, argv, _bind(node))


def start(component: Component, labdir: LabDir) -> subprocess.Popen[bytes]:
    """Start ``component`` in the background inside its namespace; log and pid in ``labdir``."""
    with open(labdir.log_file(component.name), "ab") as log:
        proc = subprocess.Popen(
            component.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: netns.enter(component.netns),
            start_new_session=True,  # not killed by the terminal's Ctrl-C after `lab up` returns
            cwd=str(labdir.path),
        )
    labdir.record_pid(component.name, proc.pid)
    labdir.record_command(component.name, component.argv)
    return proc


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join("    " + ln for ln in text[-lines:])


class ComponentFailed(LabError):
    """A component exited or was not ready in time: which, why, and its log's last lines."""

    def __init__(self, name: str, reason: str, log: Path) -> None:
        self.name, self.reason, self.tail = name, reason, _tail(log)
        super().__init__(f"{name} {reason}; see {log}:\n{self.tail}")

    def log_removed(self) -> LabError:
        """The same failure once the log is gone: a failed ``lab up`` removes the lab's state
        directory, logs included, so "see <log>" would send the reader to a missing file."""
        return LabError(f"{self.name} {self.reason}; the last lines of its log:\n{self.tail}")


def wait_ready(
    component: Component, proc: subprocess.Popen[bytes], labdir: LabDir, *, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    log = labdir.log_file(component.name)
    while True:
        code = proc.poll()
        if code is not None:
            raise ComponentFailed(
                component.name, f"exited with status {code} before it was ready", log
            )
        if component.ready():
            return
        if time.monotonic() > deadline:
            raise ComponentFailed(component.name, f"was not ready after {timeout:g}s", log)
        time.sleep(0.2)


def wait_taken_over(
    component: Component,
    proc: subprocess.Popen[bytes],
    labdir: LabDir,
    node: NodePlan,
    *,
    timeout: float,
) -> None:
    """Wait until the new agent ``proc`` holds ``node`` (it answers the handover name and
    readiness); a new agent that exits or takes too long fails with its log."""
    name = socket_name(Path(node.pin_dir))

    def holds() -> bool:
        holder = netns.call_in(node.netns, who, name)
        return holder is not None and holder.get("pid") == proc.pid and component.ready()

    wait_ready(dataclasses.replace(component, ready=holds), proc, labdir, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_exit(pid: int, poll: float = 0.2) -> None:
    """Wait for ``pid`` (not necessarily our child: started by an earlier command) to exit."""
    while alive(pid):
        time.sleep(poll)


def start_all(
    plan: LabPlan, labdir: LabDir, *, timeout: float, drain_seconds: float | None = None
) -> list[str]:
    """Start and wait for every available component; return their names."""
    started = []
    planned = plan_components(plan, labdir, drain_seconds=drain_seconds)
    if any(c.name == "ca" for c in planned):
        _write_tokens(labdir, plan)
    for component in planned:
        proc = start(component, labdir)
        wait_ready(component, proc, labdir, timeout=timeout)
        started.append(component.name)
    return started


def process_state(labdir: LabDir, name: str) -> str:
    """``running``, ``exited`` or ``absent`` (never started) for component ``name``."""
    pid = labdir.pids().get(name)
    if pid is None:
        return "absent"
    return "running" if alive(pid) else "exited"


__all__ = [
    "Component",
    "ComponentFailed",
    "agent_component",
    "agent_ready",
    "process_state",
    "start_all",
]
