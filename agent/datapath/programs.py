"""Compile, verify, pin and adopt the capture programs and their maps.

Why generations: every agent pins its objects under its own ``--pin-dir``, in a subdirectory
named after the layout version and a hash of the C sources and compile-time defines
(``v1-3f2a...``). A restarted agent whose code is unchanged finds its generation and *adopts* it:
no compile, the tc filters keep pointing at the same programs and the maps keep their entries,
so there is no moment in which meshed traffic is not steered. An agent with different programs
builds a new generation next to the old one; the reconciler fills its maps and then swaps each tc
filter in place (``replace`` is atomic per filter), and only then are old generations removed.

This module is, with ``netlink``, the only place that imports BCC, and only when it has to
compile. Compile and verifier errors become one ``ProgramLoadError`` with the log and the likely
cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from agent.base.constants import CAPTURE_MARK, HBONE_PORT, PROXY_MARK
from agent.datapath import bpfsys
from agent.datapath.layout import LAYOUT_VERSION, Program

log = logging.getLogger(__name__)

# The capture header first: BCC rewrites map calls only in the main text, not in included
# files, so the shared helpers are part of the text; the .c files' own #include of it is then
# a no-op thanks to its include guard.
SOURCES = ("capture.h", "tc_pod_ingress.bpf.c", "tc_uplink_ingress.bpf.c", "splice.bpf.c")
FUNCTIONS = {Program.POD_INGRESS: "nm_pod_ingress", Program.UPLINK_INGRESS: "nm_uplink_ingress"}
SPLICE_MAPS = ("nm_splice_links", "nm_splice_credits", "nm_splice_targets", "nm_splice_sources")
MAPS = ("nm_pods", "nm_listeners", "nm_counters", "nm_settings", *SPLICE_MAPS)
# The same-node splice's verdict program is optional: a kernel that refuses it (no sk_skb
# verdict on a sockhash) still gets capture, and the proxy relays same-node bytes itself. It is
# attached to nm_splice_sources when compiled; the attachment lives with the pinned map.
SPLICE_FUNCTION = "nm_splice_verdict"
SPLICE_PIN = "prog_splice"


class ProgramLoadError(RuntimeError):
    """The capture programs could not be compiled, verified or pinned."""


@dataclass(frozen=True)
class Marks:
    """The numbers the programs are compiled with (see ARCHITECTURE.md, "Marks and tables")."""

    proxy_mark: int = PROXY_MARK
    capture_mark: int = CAPTURE_MARK
    hbone_port: int = HBONE_PORT

    def cflags(self, include_dir: str) -> list[str]:
        return [
            f"-I{include_dir}",
            f"-DNM_PROXY_MARK={self.proxy_mark:#x}",
            f"-DNM_CAPTURE_MARK={self.capture_mark:#x}",
            f"-DNM_HBONE_PORT={self.hbone_port}",
        ]


@dataclass
class Loaded:
    """File descriptors of one generation's programs and maps (owned; ``close`` them)."""

    generation: str
    directory: Path
    adopted: bool
    programs: dict[Program, int] = field(default_factory=dict)
    maps: dict[str, bpfsys.Map] = field(default_factory=dict)
    splice_program: int | None = None

    @property
    def splice_unavailable(self) -> str | None:
        """Why this generation cannot splice (None: it can)."""
        if self.splice_program is None:
            return (
                "the kernel refused the splice program (sk_skb stream verdict on a sockhash) "
                "when this generation was compiled: see that agent's log or nodemesh check"
            )
        return None

    def close(self) -> None:
        for fd in self.programs.values():
            os.close(fd)
        if self.splice_program is not None:
            os.close(self.splice_program)
            self.splice_program = None
        for m in self.maps.values():
            m.close()
        self.programs.clear()
        self.maps.clear()


def source_dir() -> Path:
    """Where the C sources are: inside the package (installed as package data)."""
    return Path(str(resources.files("agent.datapath") / "bpf"))


def _source_text(directory: Path) -> str:
    return "".join((directory / name).read_text(encoding="utf-8") for name in SOURCES)


def _check_layout(directory: Path) -> None:
    header = (directory / "nodemesh.h").read_text(encoding="utf-8")
    found = re.search(r"#define NM_LAYOUT_VERSION (\d+)", header)
    if not found or int(found.group(1)) != LAYOUT_VERSION:
        raise ProgramLoadError(
            f"{directory / 'nodemesh.h'} declares layout {found and found.group(1)} but "
            f"agent/datapath/layout.py expects {LAYOUT_VERSION}: update both together"
        )


def generation(marks: Marks, directory: Path | None = None) -> str:
    """The pin subdirectory name for these sources and defines."""
    directory = directory or source_dir()
    digest = hashlib.sha256()
    digest.update(_source_text(directory).encode())
    digest.update((directory / "nodemesh.h").read_bytes())
    digest.update(repr(marks).encode())
    return f"v{LAYOUT_VERSION}-{digest.hexdigest()[:12]}"


def _pin_names(splice: bool = True) -> list[str]:
    names = [f"prog_{p.name.lower()}" for p in Program] + [f"map_{m}" for m in MAPS]
    return [*names, SPLICE_PIN] if splice else names


def _adopt(gen: str, directory: Path) -> Loaded:
    loaded = Loaded(generation=gen, directory=directory, adopted=True)
    try:
        for p in Program:
            loaded.programs[p] = bpfsys.open_pinned(str(directory / f"prog_{p.name.lower()}"))
        for m in MAPS:
            loaded.maps[m] = bpfsys.Map(bpfsys.open_pinned(str(directory / f"map_{m}")), m)
        if (directory / SPLICE_PIN).exists():
            loaded.splice_program = bpfsys.open_pinned(str(directory / SPLICE_PIN))
    except bpfsys.BpfError:
        loaded.close()
        raise
    return loaded


def _likely_cause(message: str) -> str:
    if "linux/" in message and "file not found" in message:
        return (
            "kernel headers are missing: BCC needs /lib/modules/$(uname -r)/build "
            "(run make setup, which links Debian's linux-headers)"
        )
    if "error:" in message:
        return "the C source does not compile: see the compiler's output below"
    # The verifier answers EACCES ("Permission denied") too, so its log is checked first.
    if "processed" in message or "invalid" in message or "unknown opcode" in message:
        return "the kernel's verifier rejected the program: the log below ends at the instruction"
    if "Permission denied" in message or "Operation not permitted" in message:
        return "loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN; CAP_SYS_RESOURCE < 5.11)"
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
    """Load the splice verdict program and attach it to nm_splice_sources; None (logged) when
    the kernel refuses, so that capture still works without the splice."""
    from bcc import BPF, BPFAttachType, libbcc

    try:
        fn = bpf.load_func(SPLICE_FUNCTION.encode(), BPF.SK_SKB)
        sources = libbcc.lib.bpf_table_fd(bpf.module, b"nm_splice_sources")
        BPF.attach_func(fn, sources, BPFAttachType.SK_SKB_STREAM_VERDICT)
    except Exception as e:  # BCC raises bare Exception for both load and attach
        log.warning(
            "same-node splice unavailable: the kernel refused the sk_skb verdict program (%s); "
            "same-node bytes are relayed in user space",
            e,
        )
        return None
    fd: int = fn.fd
    return fd


def _compile(marks: Marks, src: Path) -> tuple[Any, dict[Program, int], int | None]:
    """The BCC module, the loaded capture programs' descriptors (verified by the kernel) and
    the splice program's (None when the kernel refused it)."""
    from bcc import BPF  # deferred: only a fresh generation needs the compiler

    with _captured_stderr() as output:
        try:
            bpf = BPF(text=_source_text(src).encode(), cflags=marks.cflags(str(src)))
        except Exception as e:  # BCC raises bare Exception; the diagnostics went to fd 2
            raise _failure(f"compiling the capture programs in {src} failed", e, output()) from e
        try:
            fds = {p: bpf.load_func(fn.encode(), BPF.SCHED_CLS).fd for p, fn in FUNCTIONS.items()}
        except Exception as e:
            bpf.cleanup()
            raise _failure("the kernel refused the capture programs", e, output()) from e
        splice = _load_splice(bpf)
        if output().strip():
            log.debug("BCC output while loading:\n%s", output())
    return bpf, fds, splice


def _compile_and_pin(marks: Marks, gen: str, directory: Path, src: Path) -> None:
    from bcc import libbcc

    bpf, fds, splice = _compile(marks, src)
    staging = directory.with_name(directory.name + "-staging")  # bpffs refuses dots
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for p, fd in fds.items():
            bpfsys.pin(fd, str(staging / f"prog_{p.name.lower()}"))
        if splice is not None:
            bpfsys.pin(splice, str(staging / SPLICE_PIN))
        for m in MAPS:
            bpfsys.pin(libbcc.lib.bpf_table_fd(bpf.module, m.encode()), str(staging / f"map_{m}"))
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bpf.cleanup()
    log.info("compiled and pinned capture programs, generation %s, in %s", gen, directory)


def load(pin_dir: Path, marks: Marks, src: Path | None = None) -> Loaded:
    """Adopt this code's pinned generation under ``pin_dir`` or compile and pin a new one
    (``src``: the C sources, by default the package's)."""
    src = src or source_dir()
    _check_layout(src)
    gen = generation(marks, src)
    directory = pin_dir / gen
    pinned = sorted(os.listdir(directory)) if directory.is_dir() else []
    if pinned in (sorted(_pin_names()), sorted(_pin_names(splice=False))):
        log.info("adopting pinned capture programs and maps, generation %s", gen)
        return _adopt(gen, directory)
    if directory.exists():
        log.warning("pinned generation %s is incomplete; rebuilding it", gen)
        shutil.rmtree(directory)
    _compile_and_pin(marks, gen, directory, src)
    loaded = _adopt(gen, directory)
    loaded.adopted = False
    return loaded


def remove_other_generations(pin_dir: Path, keep: str) -> list[str]:
    """Unpin generations other than ``keep`` (after the filters point at ``keep``)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(pin_dir)):
            if entry != keep:
                shutil.rmtree(pin_dir / entry)
                removed.append(entry)
    return removed


def remove_all(pin_dir: Path) -> bool:
    """Unpin everything under ``pin_dir`` and the directory itself."""
    if not pin_dir.exists():
        return False
    shutil.rmtree(pin_dir)
    # The shared parent (/sys/fs/bpf/nodemesh) goes too once no other agent uses it.
    with contextlib.suppress(OSError):
        pin_dir.parent.rmdir()
    return True
