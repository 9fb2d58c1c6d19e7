"""Compile, verify and pin one generation of the capture programs: the short-lived child process.

Why a child: BCC compiles C with its LLVM and clang, which ``import bcc`` maps (libbcc links
them) and which stay mapped for the life of any process that loaded them, well over 100 MiB of
resident memory for a compiler the agent uses once. So the agent never imports ``bcc``: when its
generation is not pinned yet, ``programs.load`` runs ``python -m agent.datapath.compiler``, which
compiles, has the kernel verify, pins the programs and maps in ``<gen>-staging`` and renames it
to ``<gen>``, then exits; the agent then adopts the pins exactly as it adopts those of a previous
agent (libbpf only). This module is the only one of the datapath that imports ``bcc``.

Protocol with the parent (``programs._compile_in_child``): arguments name the sources, the
generation directory and the marks; stdout carries exactly one JSON object, written last:
``{"output": <what clang and BCC printed>}`` after pinning, or ``{"error": <message>}`` (exit
status ``EXIT_REFUSED``) when the programs do not compile, the verifier refuses them or pinning
fails, with the diagnostics and the likely cause, as ``ProgramLoadError`` carries them. File
descriptor 1 is pointed at stderr while BCC runs, so nothing it prints can corrupt that object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.datapath import bpfsys
from agent.datapath.programs import (
    FUNCTIONS,
    MAPS,
    SPLICE_FUNCTION,
    SPLICE_PIN,
    Marks,
    ProgramLoadError,
    pin_name,
    source_text,
)

EXIT_REFUSED = 3


_NEEDS_ROOT = "loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN; CAP_SYS_RESOURCE < 5.11)"


def _likely_cause(message: str) -> str:
    if "linux/" in message and "file not found" in message:
        return (
            "kernel headers are missing: BCC needs /lib/modules/$(uname -r)/build "
            "(run make setup, which links Debian's linux-headers)"
        )
    # EPERM is only ever the privileges; BCC writes it after "error:" ("could not open bpf map:
    # NAME, error: Operation not permitted"), so it is checked before the compiler's "error:".
    if "Operation not permitted" in message:
        return _NEEDS_ROOT
    if "error:" in message:
        return "the C source does not compile: see the compiler's output below"
    # The verifier answers EACCES ("Permission denied") too, so its log is checked first.
    if "processed" in message or "invalid" in message or "unknown opcode" in message:
        return "the kernel's verifier rejected the program: the log below ends at the instruction"
    if "Permission denied" in message:
        return _NEEDS_ROOT
    return "see the output below"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """Collect what clang, BCC and the verifier print on file descriptor 2 while loading, so that
    a failure carries its own diagnostics instead of leaving them scattered in the log."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)

        def read() -> str:
            tmp.seek(0)
            return tmp.read().decode(errors="replace")

        try:
            yield read
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _failure(what: str, error: Exception, output: str) -> ProgramLoadError:
    tail = "\n".join(output.strip().splitlines()[-40:])
    return ProgramLoadError(
        f"{what}: {error}; likely cause: {_likely_cause(output + str(error))}\n{tail}"
    )


def _load_splice(bpf: Any) -> int | None:
    """Load the splice verdict program and attach it to nm_splice_sources; None (said on
    stderr, which the agent logs) when the kernel refuses, so that capture works without it."""
    from bcc import BPF, BPFAttachType, libbcc

    try:
        fn = bpf.load_func(SPLICE_FUNCTION.encode(), BPF.SK_SKB)
        sources = libbcc.lib.bpf_table_fd(bpf.module, b"nm_splice_sources")
        BPF.attach_func(fn, sources, BPFAttachType.SK_SKB_STREAM_VERDICT)
    except Exception as e:  # BCC raises bare Exception for both load and attach
        print(
            f"same-node splice unavailable: the kernel refused the sk_skb verdict program ({e})",
            file=sys.stderr,
        )
        return None
    fd: int = fn.fd
    return fd


def _compile(marks: Marks, src: Path) -> tuple[Any, dict[str, int], str]:
    """The BCC module, the loaded programs' descriptors by pin name (verified by the kernel;
    the splice program only when the kernel took it) and what BCC printed."""
    from bcc import BPF  # only here: this process exits once the programs are pinned

    with _captured_stderr() as output:
        try:
            bpf = BPF(text=source_text(src).encode(), cflags=marks.cflags(str(src)))
        except Exception as e:  # BCC raises bare Exception; the diagnostics went to fd 2
            raise _failure(f"compiling the capture programs in {src} failed", e, output()) from e
        try:
            fds = {
                pin_name(p): bpf.load_func(fn.encode(), BPF.SCHED_CLS).fd
                for p, fn in FUNCTIONS.items()
            }
        except Exception as e:
            bpf.cleanup()
            raise _failure("the kernel refused the capture programs", e, output()) from e
        splice = _load_splice(bpf)
        if splice is not None:
            fds[SPLICE_PIN] = splice
        return bpf, fds, output()


def build(marks: Marks, directory: Path, src: Path) -> str:
    """Compile the sources in ``src`` and pin programs and maps as ``directory`` (complete or
    not at all); returns what BCC printed."""
    from bcc import libbcc

    bpf, fds, output = _compile(marks, src)
    staging = directory.with_name(directory.name + "-staging")  # bpffs refuses dots
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name, fd in fds.items():
            bpfsys.pin(fd, str(staging / name))
        for m in MAPS:
            fd = libbcc.lib.bpf_table_fd(bpf.module, m.encode())
            bpfsys.pin(fd, str(staging / f"map_{m}"))
        staging.rename(directory)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise ProgramLoadError(
                f"pinning the compiled capture programs as {directory} failed: {e}; is bpffs "
                "mounted at /sys/fs/bpf and writable (root)?"
            ) from e
        raise
    finally:
        bpf.cleanup()
    return output


def _number(text: str) -> int:
    return int(text, 0)  # 0x539 and 1337 alike


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent.datapath.compiler",
        description="Compile the capture programs with BCC and pin one generation (run by the "
        "agent in a child process; prints one JSON object).",
    )
    parser.add_argument("--src", type=Path, required=True, help="directory of the C sources")
    parser.add_argument("--into", type=Path, required=True, help="generation directory to pin")
    parser.add_argument("--proxy-mark", type=_number, required=True)
    parser.add_argument("--capture-mark", type=_number, required=True)
    parser.add_argument("--hbone-port", type=_number, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    marks = Marks(
        proxy_mark=args.proxy_mark, capture_mark=args.capture_mark, hbone_port=args.hbone_port
    )
    sys.stdout.flush()
    result_fd = os.dup(1)
    os.dup2(2, 1)  # whatever BCC prints goes to stderr; stdout carries only the result
    try:
        result: dict[str, str] = {"output": build(marks, args.into, args.src.resolve())}
    except ProgramLoadError as e:
        result = {"error": str(e)}
    with os.fdopen(result_fd, "w", encoding="utf-8") as out:
        json.dump(result, out)
    return EXIT_REFUSED if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
