"""Compile, verify, pin and adopt the capture programs and their maps.

Why generations: every agent pins its objects under its own ``--pin-dir``, in a subdirectory
named after the layout version and a hash of the C sources and compile-time defines
(``v1-3f2a...``). A restarted agent whose code is unchanged finds its generation and *adopts* it:
no compile, the tc filters keep pointing at the same programs and the maps keep their entries,
so there is no moment in which meshed traffic is not steered. An agent with different programs
builds a new generation next to the old one; the reconciler fills its maps and then swaps each tc
filter in place (``replace`` is atomic per filter), and only then are old generations removed.

Why a child process compiles: this module never imports BCC. A new generation is compiled,
verified and pinned by ``python -m agent.datapath.compiler``, a short-lived child, and then
adopted like any other (libbpf only, see ``bpfsys``), so the agent never maps BCC's LLVM and
clang (over 100 MiB resident for the life of the process otherwise). Compile and verifier
errors come back from the child as one ``ProgramLoadError`` with the log and the likely cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

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
# verdict on a sockhash) still gets capture, and the proxy relays same-node bytes itself. The
# compiler attaches it to nm_splice_sources; the attachment lives with the pinned map.
SPLICE_FUNCTION = "nm_splice_verdict"
SPLICE_PIN = "prog_splice"
# A compile takes seconds; this only bounds a child that hangs.
COMPILE_TIMEOUT_SECONDS = 300.0


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

    def argv(self) -> list[str]:
        """The same numbers as arguments of ``python -m agent.datapath.compiler``."""
        return [
            f"--proxy-mark={self.proxy_mark:#x}",
            f"--capture-mark={self.capture_mark:#x}",
            f"--hbone-port={self.hbone_port}",
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


def source_text(directory: Path) -> str:
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
    digest.update(source_text(directory).encode())
    digest.update((directory / "nodemesh.h").read_bytes())
    digest.update(repr(marks).encode())
    return f"v{LAYOUT_VERSION}-{digest.hexdigest()[:12]}"


def pin_name(program: Program) -> str:
    return f"prog_{program.name.lower()}"


def _pin_names(splice: bool = True) -> list[str]:
    names = [pin_name(p) for p in Program] + [f"map_{m}" for m in MAPS]
    return [*names, SPLICE_PIN] if splice else names


def _adopt(gen: str, directory: Path) -> Loaded:
    loaded = Loaded(generation=gen, directory=directory, adopted=True)
    try:
        for p in Program:
            loaded.programs[p] = bpfsys.open_pinned(str(directory / pin_name(p)))
        for m in MAPS:
            loaded.maps[m] = bpfsys.Map(bpfsys.open_pinned(str(directory / f"map_{m}")), m)
        if (directory / SPLICE_PIN).exists():
            loaded.splice_program = bpfsys.open_pinned(str(directory / SPLICE_PIN))
    except bpfsys.BpfError:
        loaded.close()
        raise
    return loaded


def _compile_in_child(marks: Marks, directory: Path, src: Path) -> None:
    """Have ``python -m agent.datapath.compiler`` compile, verify and pin the generation
    ``directory``; its refusal becomes this process's ``ProgramLoadError``, message unchanged."""
    argv = [
        sys.executable, "-m", "agent.datapath.compiler", "--src", str(src),
        "--into", str(directory), *marks.argv(),
    ]  # fmt: skip
    # The child imports this very package, wherever it was imported from here.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *filter(None, [env.get("PYTHONPATH")])]
    )
    log.info("compiling capture programs in a child process: %s", " ".join(argv))
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            timeout=COMPILE_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise ProgramLoadError(
            f"compiling the capture programs took over {COMPILE_TIMEOUT_SECONDS:.0f}s and was "
            "stopped; is the machine overloaded?"
        ) from e
    except OSError as e:
        raise ProgramLoadError(f"cannot run the BPF compiler process {argv[0]}: {e}") from e
    stderr = done.stderr.decode(errors="replace").strip()
    if stderr:
        log.debug("BPF compiler process stderr:\n%s", stderr)
    try:
        result = json.loads(done.stdout)
    except ValueError:
        code = done.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        tail = "\n".join(stderr.splitlines()[-40:])
        raise ProgramLoadError(
            f"the BPF compiler process ({' '.join(argv)}) {how} without a result; its output:\n"
            f"{tail}"
        ) from None
    if "error" in result:
        raise ProgramLoadError(result["error"])
    if result["output"].strip():
        log.debug("BCC output while loading:\n%s", result["output"])


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
    _compile_in_child(marks, directory, src)
    log.info("compiled and pinned capture programs, generation %s, in %s", gen, directory)
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
