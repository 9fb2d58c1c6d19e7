"""``nodemesh lab apply/delete -f FILE`` read YAML as strictly as the lab's topology and the
agents' cluster file do, and a file that is not valid YAML is one error naming the file and
the line, never a traceback (no root needed: the file is refused before the lab is looked up).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.lab.handle import Lab
from agent.sources.fields import DocumentError

SERVICE = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\n"


def _apply(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    path = tmp_path / "objects.yaml"
    path.write_text(text)
    assert main(["lab", "apply", "--name", "nolab", "-f", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    return out.err.replace(str(path), "objects.yaml")


POLICY = "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        # a traceback before
        (SERVICE + "spec: {ports: [{port: !!int abc}]}\n", "a value cannot be read (ValueError"),
        # kubectl refuses it too; before, the second spec silently replaced the first
        (POLICY + "spec: {action: DENY}\nspec: {action: ALLOW}\n", "duplicate key 'spec'"),
    ],
)
def test_yaml_the_cluster_document_refuses_is_refused_here_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, why: str
) -> None:
    err = _apply(tmp_path, text, capsys)
    assert err.startswith("nodemesh lab: error: objects.yaml: not valid YAML: ") and why in err


def test_a_syntax_error_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _apply(tmp_path, SERVICE + "---\nspec: {ports: [{port: 80}\n", capsys)
    assert 'in "objects.yaml", line 5, column 15' in err and "<unicode string>" not in err


def test_every_document_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Valid YAML gets as far as the lab, which is not up."""
    err = _apply(tmp_path, f"---\n{SERVICE}---\n---\n{SERVICE}", capsys)
    assert err == (
        "nodemesh lab: error: lab 'nolab' is not up; start it with `nodemesh lab up --name nolab`\n"
    )


def test_the_lab_handle_reads_files_as_the_cli_does(tmp_path: Path) -> None:
    """Tests and benchmarks apply files through ``Lab.apply``: the same refusal, before the
    lab is looked up."""
    path = tmp_path / "objects.yaml"
    path.write_text(POLICY + "spec: {action: DENY}\nspec: {action: ALLOW}\n")
    with pytest.raises(DocumentError, match="duplicate key 'spec'"):
        Lab("nolab").apply(path)
