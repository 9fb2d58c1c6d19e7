"""The lab's state directory: what ``lab up`` recorded, so every later command can find it.

``/run/nodemesh/lab/<lab>/`` holds ``plan.json`` (names and addresses, written before anything
is built, so ``down`` works after a crash), ``cluster.yaml`` (the cluster document the agents and
the CA read; rewritten atomically by ``annotate/apply/delete`` so a reader never sees half a
file), ``logs/``, ``pids/``, ``ca/`` (the CA's root; ``root.pem`` is the agents' ``--ca-root``)
and ``tokens/`` (one bearer token per node, plus ``tokens.yaml`` for the CA). /run is a tmpfs:
a reboot, which also drops every namespace, forgets the lab too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.lab.topology import STATE_ROOT, LabPlan
from agent.sources.document import ClusterDocument, dump_document, load_document


def write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class LabDir:
    lab: str
    root: str = STATE_ROOT

    @property
    def path(self) -> Path:
        return Path(self.root) / self.lab

    @property
    def plan_file(self) -> Path:
        return self.path / "plan.json"

    @property
    def cluster_file(self) -> Path:
        return self.path / "cluster.yaml"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def ca_dir(self) -> Path:
        return self.path / "ca"

    @property
    def node_tokens_file(self) -> Path:
        return self.path / "tokens.yaml"

    def token_file(self, node: str) -> Path:
        return self.path / "tokens" / node

    def create(self) -> None:
        for sub in (self.path, self.logs, self.path / "pids", self.ca_dir, self.path / "tokens"):
            sub.mkdir(parents=True, exist_ok=True, mode=0o700)

    def exists(self) -> bool:
        return self.plan_file.exists()

    def write_plan(self, plan: LabPlan) -> None:
        write_atomic(self.plan_file, json.dumps(plan.to_json(), indent=2))

    def read_plan(self) -> LabPlan | None:
        try:
            return LabPlan.from_json(json.loads(self.plan_file.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None

    def write_cluster(self, doc: ClusterDocument) -> None:
        write_atomic(self.cluster_file, dump_document(doc))

    def read_cluster(self) -> ClusterDocument:
        return load_document(self.cluster_file)

    def record_pid(self, component: str, pid: int) -> None:
        write_atomic(self.path / "pids" / component, f"{pid}\n")

    def record_command(self, component: str, argv: tuple[str, ...]) -> None:
        (self.path / "commands").mkdir(exist_ok=True)
        write_atomic(self.path / "commands" / f"{component}.json", json.dumps(list(argv)))

    def command(self, component: str) -> tuple[str, ...] | None:
        """The command line ``component`` was last started with."""
        try:
            text = (self.path / "commands" / f"{component}.json").read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return tuple(str(a) for a in json.loads(text))

    def pids(self) -> dict[str, int]:
        found = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in (self.path / "pids").iterdir():
                with contextlib.suppress(ValueError):
                    found[entry.name] = int(entry.read_text(encoding="ascii").strip())
        return found

    def log_file(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize read-modify-write of ``cluster.yaml`` between concurrent lab commands."""
        with open(self.path / ".lock", "a", encoding="ascii") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
