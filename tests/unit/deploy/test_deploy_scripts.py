"""Linters for what cannot run here: the vagrant scripts (shellcheck), the image (hadolint), and
the one package list that both the host setup and the image build read."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.unit.deploy.manifests import REPO, tool

SHELL_SCRIPTS = sorted((REPO / "vagrant").rglob("*.sh"))


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)


def shellcheck() -> str:
    path = shutil.which("shellcheck")
    if path is None:
        raise FileNotFoundError("shellcheck is missing: make setup (scripts/debian-packages.txt)")
    return path


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_vagrant_scripts_are_shellcheck_clean(script: object) -> None:
    result = run([shellcheck(), "--external-sources", str(script)])
    assert result.returncode == 0, result.stdout


def test_setup_script_is_shellcheck_clean() -> None:
    result = run([shellcheck(), "scripts/setup.sh"])
    assert result.returncode == 0, result.stdout


def test_vagrant_has_its_scripts() -> None:
    names = {p.relative_to(REPO / "vagrant").as_posix() for p in SHELL_SCRIPTS}
    assert {"smoke.sh", "provision/common.sh", "provision/control-plane.sh"} <= names
    assert "provision/worker.sh" in names


def test_dockerfile_is_hadolint_clean() -> None:
    result = run([str(tool("hadolint")), "Dockerfile"])
    assert result.returncode == 0, result.stdout


def test_image_packages_come_from_the_shared_list() -> None:
    # The Dockerfile installs through scripts/setup.sh --image, which reads the packages marked
    # "image"; BCC and a venv-capable Python must be among them or the agent cannot load.
    marked = {
        line.split()[0]
        for line in (REPO / "scripts/debian-packages.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and line.split()[1:] == ["image"]
    }
    assert {"python3-bpfcc", "python3-venv"} <= marked
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "scripts/setup.sh --image" in dockerfile
