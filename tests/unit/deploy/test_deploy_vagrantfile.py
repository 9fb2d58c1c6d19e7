"""vagrant/Vagrantfile evaluated by Ruby against a stand-in for Vagrant (vagrant_stub.rb).

Vagrant cannot run here, but its file can: this catches Ruby errors, provisioners that point at
missing scripts, and scripts that would stop at their first line because the Vagrantfile does not
pass a variable they require (`: "${NAME:?}"`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.unit.deploy.manifests import REPO

STUB = Path(__file__).with_name("vagrant_stub.rb")


def machines(tmp_path: Path) -> list[dict[str, Any]]:
    ruby = shutil.which("ruby")
    if ruby is None:
        raise FileNotFoundError("ruby is missing: make setup (scripts/debian-packages.txt)")
    # A copy: the Vagrantfile keeps a generated bootstrap token in its own .vagrant/.
    copy = tmp_path / "vagrant"
    shutil.copytree(REPO / "vagrant", copy, ignore=shutil.ignore_patterns(".vagrant"))
    result = subprocess.run(
        [ruby, str(STUB), "Vagrantfile"], cwd=copy, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    parsed: list[dict[str, Any]] = json.loads(result.stdout)
    return parsed


def required_variables(script: Path) -> set[str]:
    return set(re.findall(r'"\$\{([A-Z_]+):\?\}"', script.read_text()))


def test_one_control_plane_and_two_workers(tmp_path: Path) -> None:
    found = {m["name"]: [p["name"] for p in m["provisioners"]] for m in machines(tmp_path)}
    assert found == {
        "cp": ["common", "control-plane"],
        "w1": ["common", "worker"],
        "w2": ["common", "worker"],
    }


def test_every_provisioner_gets_the_variables_its_script_requires(tmp_path: Path) -> None:
    for machine in machines(tmp_path):
        for provisioner in machine["provisioners"]:
            script = REPO / "vagrant" / provisioner["path"]
            assert script.is_file(), f"{machine['name']}: {script} does not exist"
            missing = required_variables(script) - set(provisioner["env"])
            assert not missing, f"{machine['name']} runs {script.name} without {missing}"


def test_workers_join_the_control_plane_with_its_token(tmp_path: Path) -> None:
    by_name = {m["name"]: m for m in machines(tmp_path)}
    init = next(p for p in by_name["cp"]["provisioners"] if p["name"] == "control-plane")
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", init["env"]["BOOTSTRAP_TOKEN"])
    for worker in ("w1", "w2"):
        join = next(p for p in by_name[worker]["provisioners"] if p["name"] == "worker")
        assert join["env"]["BOOTSTRAP_TOKEN"] == init["env"]["BOOTSTRAP_TOKEN"]
        assert join["env"]["CONTROL_PLANE"] == f"{by_name['cp']['ip']}:6443"


def test_required_variables_are_read_from_the_scripts() -> None:
    # The check above reads this idiom; a script that stops using it would make it vacuous.
    assert required_variables(REPO / "vagrant/provision/worker.sh") == {
        "CONTROL_PLANE",
        "BOOTSTRAP_TOKEN",
    }
