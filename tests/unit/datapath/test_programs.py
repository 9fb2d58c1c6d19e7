"""Generations and load errors of the capture programs, without a kernel."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.datapath import compiler, programs
from agent.datapath.programs import Marks, ProgramLoadError


def test_sources_ship_inside_the_package() -> None:
    found = sorted(p.name for p in programs.source_dir().iterdir() if p.suffix in (".c", ".h"))
    assert found == [
        "capture.h",
        "nodemesh.h",
        "splice.bpf.c",
        "tc_pod_ingress.bpf.c",
        "tc_uplink_ingress.bpf.c",
    ]


def test_generation_depends_on_the_defines_and_has_no_dots() -> None:
    default = programs.generation(Marks())
    assert default == programs.generation(Marks())
    assert default != programs.generation(Marks(capture_mark=0x77))
    assert default.startswith("v5-") and "." not in default  # bpffs refuses dots


def test_generation_depends_on_the_sources(tmp_path: Path) -> None:
    copy = tmp_path / "bpf"
    shutil.copytree(programs.source_dir(), copy)
    before = programs.generation(Marks(), copy)
    with (copy / "tc_pod_ingress.bpf.c").open("a") as f:
        f.write("\n/* changed */\n")
    assert programs.generation(Marks(), copy) != before


def test_cflags_carry_the_marks_as_defines() -> None:
    flags = Marks(proxy_mark=0x539, capture_mark=0x1539, hbone_port=15008).cflags("/src")
    assert flags == [
        "-I/src", "-DNM_PROXY_MARK=0x539", "-DNM_CAPTURE_MARK=0x1539", "-DNM_HBONE_PORT=15008"
    ]  # fmt: skip


def test_layout_mismatch_is_refused(tmp_path: Path) -> None:
    (tmp_path / "nodemesh.h").write_text("#define NM_LAYOUT_VERSION 99\n")
    with pytest.raises(ProgramLoadError, match="update both together"):
        programs._check_layout(tmp_path)


@pytest.mark.parametrize(
    ("message", "cause"),
    [
        ("fatal error: 'linux/bpf.h' file not found", "kernel headers are missing"),
        ("bpf: Failed to load program: Operation not permitted", "needs root"),
        ("R1 invalid mem access 'scalar'", "verifier rejected"),
        # BCC's words as a user without root sees them: "error:" is no compiler error here
        (
            "Failed to compile BPF module <text>\n"
            "could not open bpf map: nm_splice_sources, error: Operation not permitted",
            "needs root",
        ),
        ("nodemesh.bpf.c:12:3: error: use of undeclared identifier 'x'", "does not compile"),
    ],
)
def test_load_errors_name_the_likely_cause(message: str, cause: str) -> None:
    assert cause in compiler._likely_cause(message)


def test_the_header_gets_the_agents_numbers_only_from_the_loader() -> None:
    """Marks and the HBONE port are defined once in Python (agent.base.constants) and reach C as
    -D defines; a default in the header would be a second definition that could drift."""
    header = (programs.source_dir() / "nodemesh.h").read_text()
    flags = " ".join(Marks().cflags("/src"))
    for name in ("NM_PROXY_MARK", "NM_CAPTURE_MARK", "NM_HBONE_PORT"):
        assert f"#define {name}" not in header
        assert f"-D{name}=" in flags


def test_a_refusal_in_the_compiler_child_comes_back_as_its_message(tmp_path: Path) -> None:
    """The real child, without a kernel: sources that are not there fail before any load, and
    the message crosses the process boundary intact (the kernel-backed cases are in
    tests/integration/datapath/test_datapath_load_errors.py)."""
    missing = tmp_path / "no-sources"
    with pytest.raises(ProgramLoadError) as failure:
        programs._compile_in_child(Marks(), tmp_path / "pins" / "v1-x", missing)
    assert f"compiling the capture programs in {missing} failed" in str(failure.value)
    assert "No such file or directory" in str(failure.value)
    assert not (tmp_path / "pins").exists()


def test_a_compiler_child_that_dies_without_a_result_is_a_load_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def killed(argv: list[str], **_: object) -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess(argv, -9, stdout=b"", stderr=b"compiling...\n")

    monkeypatch.setattr(programs.subprocess, "run", killed)
    with pytest.raises(ProgramLoadError, match="killed by signal 9 without a result"):
        programs._compile_in_child(Marks(), tmp_path / "v1-x", programs.source_dir())


def test_the_compiler_child_gets_the_marks_it_is_asked_for() -> None:
    marks = Marks(proxy_mark=0x77, capture_mark=0x1234, hbone_port=15999)
    args = compiler._parser().parse_args(["--src", "/s", "--into", "/p", *marks.argv()])
    rebuilt = Marks(
        proxy_mark=args.proxy_mark, capture_mark=args.capture_mark, hbone_port=args.hbone_port
    )
    assert rebuilt == marks
