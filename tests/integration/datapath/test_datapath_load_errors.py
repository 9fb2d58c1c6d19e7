"""Compile errors and verifier rejections become one ProgramLoadError carrying the diagnostics,
and leave nothing pinned."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.datapath import programs
from agent.datapath.programs import Marks, ProgramLoadError

pytestmark = pytest.mark.root

UNCHECKED_READ = """#include "capture.h"
int nm_pod_ingress(struct __sk_buff *skb) { return *(int *)(long)skb->data; }
"""
SYNTAX_ERROR = """#include "capture.h"
int nm_pod_ingress(struct __sk_buff *skb) { return nm_missing_semicolon }
"""


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    src = tmp_path / "bpf"
    shutil.copytree(programs.source_dir(), src)
    return src


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    path = Path(f"/sys/fs/bpf/nodemesh/loaderr-{secrets.token_hex(3)}")
    try:
        yield path
    finally:
        programs.remove_all(path)


def test_verifier_rejection_carries_the_verifier_log(broken: Path, pin_dir: Path) -> None:
    (broken / "tc_pod_ingress.bpf.c").write_text(UNCHECKED_READ)
    with pytest.raises(ProgramLoadError) as failure:
        programs.load(pin_dir, Marks(), broken)
    message = str(failure.value)
    assert "verifier rejected" in message
    assert "invalid access to packet" in message  # the verifier's own words
    assert not pin_dir.exists()


def test_compile_error_carries_the_compiler_output(broken: Path, pin_dir: Path) -> None:
    (broken / "tc_pod_ingress.bpf.c").write_text(SYNTAX_ERROR)
    with pytest.raises(ProgramLoadError) as failure:
        programs.load(pin_dir, Marks(), broken)
    message = str(failure.value)
    assert "does not compile" in message and "nm_missing_semicolon" in message
    assert not pin_dir.exists()
