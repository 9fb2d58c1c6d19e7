"""A lab driven from Python: the object the ``lab`` pytest fixture and the benchmarks use.

It calls the same functions as ``nodemesh lab`` (so tests exercise the real commands' logic) and
runs commands in pods the way ``lab exec`` does: only the network namespace changes, stdio and
exit status pass through.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.lab import components, control, netns
from agent.lab.topology import DEFAULT_TOPOLOGY, LabError
from agent.sources.fields import load_yaml_documents


class Lab:
    """One running lab; ``Lab.up(...)`` builds it, ``down()`` removes it."""

    def __init__(self, name: str, *, state_root: str | None = None) -> None:
        self.name = name
        self._state_root = state_root
        self.state_dir = control.labdir_of(name, state_root).path

    @classmethod
    def up(
        cls,
        name: str,
        *,
        topology: str | None = None,
        components: bool = True,
        timeout: float = 60.0,
        drain_seconds: float | None = None,
        state_root: str | None = None,
    ) -> Lab:
        control.up(
            name,
            topology or DEFAULT_TOPOLOGY,
            source="<default topology>" if topology is None else f"<topology of lab {name}>",
            with_components=components,
            timeout=timeout,
            drain_seconds=drain_seconds,
            state_root=state_root,
        )
        return cls(name, state_root=state_root)

    def down(self) -> None:
        control.down(self.name, state_root=self._state_root)

    def upgrade(
        self, node: str, *, timeout: float = 60.0, drain_seconds: float | None = None
    ) -> control.Upgrade:
        """``nodemesh lab upgrade NODE``: returns once the new agent holds the node."""
        return control.upgrade(
            self.name, node, timeout=timeout, drain_seconds=drain_seconds,
            state_root=self._state_root,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The ``lab status --json`` dict."""
        return control.status(self.name, state_root=self._state_root)

    def netns(self, target: str) -> str:
        _, plan = control.load(self.name, state_root=self._state_root)
        return control.resolve_target(plan, target)

    def pod(self, name: str) -> dict[str, Any]:
        namespace, _, pod = name.rpartition("/")
        return next(
            p
            for p in self.status()["pods"]
            if p["name"] == pod and (not namespace or p["namespace"] == namespace)
        )

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.status()["nodes"] if n["name"] == name)

    def popen(self, target: str, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in the background inside ``target``'s network namespace."""
        name = self.netns(target)
        return subprocess.Popen(list(cmd), preexec_fn=lambda: netns.enter(name), **kw)

    def exec(self, target: str, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``cmd`` to completion inside ``target``'s network namespace (``subprocess.run``
        keywords pass through: ``capture_output``, ``text``, ``check``, ``timeout``, ...)."""
        name = self.netns(target)
        return subprocess.run(list(cmd), preexec_fn=lambda: netns.enter(name), **kw)

    def component(self, name: str) -> components.Component:
        """The planned component ``name`` (``ca`` or ``agent-<node>``): its command line and
        readiness probe, exactly as ``lab up`` starts it."""
        labdir, plan = control.load(self.name, state_root=self._state_root)
        planned = components.plan_components(plan, labdir)
        for component in planned:
            if component.name == name:
                return component
        known = ", ".join(c.name for c in planned)
        raise LabError(f"no component {name!r} in lab {self.name}; known: {known}")

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Send ``sig`` to component ``name``'s recorded process and wait until it is gone
        (the drills' outage: SIGKILL is a crash, SIGTERM a graceful stop)."""
        labdir, _ = control.load(self.name, state_root=self._state_root)
        pid = labdir.pids().get(name)
        if pid is None or components.process_state(labdir, name) != "running":
            raise LabError(f"{name} is not running in lab {self.name}")
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(ChildProcessError):  # not ours when `lab up` started it
                os.waitpid(pid, os.WNOHANG)
            if components.process_state(labdir, name) != "running":
                return
            if time.monotonic() > deadline:
                raise LabError(f"{name} (pid {pid}) still runs {timeout:.0f}s after {sig.name}")
            time.sleep(0.05)

    def start(
        self, name: str, *extra: str, without: Sequence[str] = (), timeout: float = 60.0
    ) -> None:
        """Start component ``name`` again (after ``kill``) with its planned command line minus
        the ``without`` flags (each with its value) plus ``extra`` arguments (later flags win,
        e.g. ``"--max-ttl", "12s"``); return when it is ready."""
        labdir, _ = control.load(self.name, state_root=self._state_root)
        if components.process_state(labdir, name) == "running":
            raise LabError(f"{name} already runs in lab {self.name}; kill it first")
        planned = self.component(name)
        argv = _drop_flags(planned.argv, without)
        component = components.Component(
            planned.name, planned.netns, (*argv, *extra), planned.ready
        )
        proc = components.start(component, labdir)
        components.wait_ready(component, proc, labdir, timeout=timeout)

    def annotate(self, pod: str, *changes: str) -> None:
        control.annotate(self.name, pod, changes, state_root=self._state_root)

    def apply(
        self, manifests: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> None:
        source = str(manifests) if isinstance(manifests, str | Path) else "the manifests"
        control.apply(self.name, _manifests(manifests), state_root=self._state_root, source=source)

    def delete(
        self, manifests: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> None:
        control.delete(self.name, _manifests(manifests), state_root=self._state_root)


def _drop_flags(argv: Sequence[str], flags: Sequence[str]) -> tuple[str, ...]:
    """``argv`` without each of ``flags`` and the value that follows it."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            out.append(arg)
    return tuple(out)


def _manifests(
    value: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, str | Path):
        text = Path(value).read_text(encoding="utf-8")
        return load_yaml_documents(text, source=str(value))  # as `nodemesh lab apply -f` reads
    return list(value)


# The ``lab_factory`` fixture: ``lab_factory(topology=None, components=True, timeout=60.0)``.
LabFactory = Callable[..., Lab]
