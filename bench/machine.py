"""The machine the numbers were measured on, and what its CPU can encrypt on one core.

``openssl speed -evp <cipher>`` with 16 KiB blocks (a full TLS record) is the ceiling for one
stream through any TLS proxy on this CPU: a proxy that reaches a good fraction of it spends its
time in the cipher, one far below it spends it elsewhere (copies, Python, syscalls).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any


def describe() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": sys.version.split()[0],
        "openssl": _version(["openssl", "version"]),
        "iperf3": _version(["iperf3", "--version"]),
        "stunnel": _version(["stunnel4", "-version"], stderr=True),
    }


def code_version(repo: str) -> dict[str, Any]:
    """The commit measured, and the files of the product that differed from it (the working tree
    is shared while engineers work: numbers of a dirty tree belong to no commit alone)."""
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True, timeout=10)  # fmt: skip
        status = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "agent"],
                                capture_output=True, text=True, check=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": f"unknown ({e})", "dirty": []}
    dirty = [line[3:] for line in status.stdout.splitlines()]
    return {"commit": head.stdout.strip(), "dirty": dirty}


def _os_release() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except FileNotFoundError:
        pass
    return platform.platform()


def _version(argv: list[str], *, stderr: bool = False) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = done.stderr if stderr else done.stdout
    for line in text.splitlines():
        if line.strip() and ("stunnel" not in argv[0] or line.startswith("stunnel ")):
            return line.strip()
    return "unknown"


def openssl_speed(cipher: str, seconds: int) -> float:
    """Bytes per second of ``cipher`` (e.g. ``aes-256-gcm``) on one core, 16 KiB blocks."""
    argv = ["openssl", "speed", "-mr", "-seconds", str(seconds), "-bytes", "16384", "-evp", cipher]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 30, check=True
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {e}") from e
    return parse_speed(done.stdout)


def parse_speed(output: str) -> float:
    """The rate from ``openssl speed -mr`` output: the ``+F:`` line's last field (bytes/s)."""
    for line in output.splitlines():
        if line.startswith("+F:"):
            return float(line.rsplit(":", 1)[1])
    raise RuntimeError(f"no +F: result line in openssl speed output: {output[-200:]!r}")
