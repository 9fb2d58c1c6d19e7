"""``nodemesh check``: can this host run the mesh?

Why real probes instead of version checks: what the mesh needs (``bpf_sk_assign`` at tc ingress,
sockmaps, clsact with direct-action cls_bpf, ``IP_TRANSPARENT``) depends on kernel config, on
lockdown and on the privileges of the caller, not on a version number. Each requirement is
therefore proven by doing the smallest real thing: load a tiny tc program that calls
``bpf_sk_assign``, create a sockmap, attach the program to a clsact qdisc in a scratch network
namespace that is removed afterwards. The host itself is not changed, except that bpffs is
mounted at /sys/fs/bpf when it is missing (the agent would mount it anyway).

Probes are separate from the report: a ``Requirement`` couples a probe with the fix a user needs
when it fails, and ``run_checks`` turns probes into rows. Tests replace probes to simulate a host
that lacks something and check the exact message and fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from agent import preflight_probes as probes


class ProbeFailed(Exception):
    """A requirement is not met; the message says what was observed, ``fix`` (when given)
    what to do instead of the requirement's own fix."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.fix = fix


Probe = Callable[[], str]


@dataclass(frozen=True)
class Requirement:
    name: str
    title: str
    probe: Probe  # returns what it observed on success, raises ProbeFailed otherwise
    fix: str


@dataclass(frozen=True)
class CheckResult:
    name: str
    title: str
    ok: bool
    detail: str
    fix: str  # empty when ok


def _wrap(func: Callable[[], str]) -> Probe:
    """Turn the OS-level errors of a host probe into ``ProbeFailed`` with the errno text."""

    def probe() -> str:
        try:
            return func()
        except probes.Unsupported as e:
            raise ProbeFailed(str(e), e.fix) from e

    return probe


def requirements() -> tuple[Requirement, ...]:
    """What the mesh needs, in the order a user should fix them. One line per requirement."""
    return (
        Requirement(
            "privileges",
            "root or CAP_BPF+CAP_NET_ADMIN+CAP_SYS_ADMIN",
            _wrap(probes.privileges),
            "run as root (sudo nodemesh ...) or grant the capabilities: "
            "setcap cap_bpf,cap_net_admin,cap_sys_admin+ep, or securityContext.capabilities.add",
        ),
        Requirement(
            "bpf-syscall",
            "bpf() system call",
            _wrap(probes.bpf_syscall),
            "the kernel needs CONFIG_BPF_SYSCALL=y; with kernel.unprivileged_bpf_disabled "
            "run as root; in a container, no seccomp profile that blocks bpf()",
        ),
        Requirement(
            "bpffs",
            "bpffs mounted at /sys/fs/bpf",
            _wrap(probes.bpffs),
            "mount -t bpf bpf /sys/fs/bpf (in Kubernetes, mount the host's /sys/fs/bpf)",
        ),
        Requirement(
            "cgroup2",
            "cgroup v2 (unified hierarchy)",
            _wrap(probes.cgroup2),
            "boot with systemd.unified_cgroup_hierarchy=1 (Debian 12 default) or "
            "mount -t cgroup2 none /sys/fs/cgroup",
        ),
        Requirement(
            "bcc",
            "BCC Python module",
            _wrap(probes.bcc_module),
            "apt-get install python3-bpfcc, then make setup (links it into .venv); "
            "never pip install bcc (an unrelated package)",
        ),
        Requirement(
            "kernel-headers",
            "kernel headers for BCC",
            _wrap(probes.kernel_headers),
            "make setup (links Debian's linux-headers-amd64 when the kernel has no headers "
            "package) or apt-get install linux-headers-$(uname -r)",
        ),
        Requirement(
            "sk-assign",
            "bpf_sk_assign in a tc program",
            _wrap(probes.sk_assign),
            "needs Linux >= 5.7 with CONFIG_NET_CLS_BPF and CONFIG_BPF_SYSCALL; "
            "see the detail for the verifier's or compiler's answer",
        ),
        Requirement(
            "sockmap",
            "sockmap",
            _wrap(probes.sockmap),
            "the kernel needs CONFIG_BPF_STREAM_PARSER=y (sockmap/sockhash for the same-node path)",
        ),
        Requirement(
            "splice",
            "same-node splice (optional)",
            probes.splice,  # never fails: without it the proxy relays same-node bytes itself
            "optional: needs CONFIG_BPF_STREAM_PARSER=y and Linux >= 5.8; without it the proxy "
            "relays same-node bytes in user space",
        ),
        Requirement(
            "relay-splice",
            "splice(2) in the relay (optional)",
            probes.relay_splice,  # never fails: without it relays copy through user space
            "optional: needs splice(2) on TCP sockets (Linux) and Python >= 3.10; without it "
            "socket-to-socket relays copy every byte through user space",
        ),
        Requirement(
            "clsact-cls-bpf",
            "clsact qdisc and cls_bpf (direct-action)",
            _wrap(probes.clsact_cls_bpf),
            "the kernel needs CONFIG_NET_SCH_INGRESS (clsact) and CONFIG_NET_CLS_BPF "
            "(modprobe sch_ingress cls_bpf if they are modules)",
        ),
        Requirement(
            "ip-transparent",
            "IP_TRANSPARENT socket option",
            _wrap(probes.ip_transparent),
            "needs CAP_NET_ADMIN (or CAP_NET_RAW); run as root",
        ),
        Requirement(
            "open-files",
            "open files limit (connections per process)",
            _wrap(probes.open_files),
            "raise the hard RLIMIT_NOFILE to 65,536 or more: LimitNOFILE= in a systemd unit, "
            "ulimit -Hn in the shell that starts the agent, or the container runtime's nofile "
            "ulimit",
        ),
        Requirement(
            "capture-failure-mode",
            "capture failure mode (setting)",
            _wrap(probes.capture_failure_mode),
            "choose with nodemesh agent --fail-open (default: fail closed)",
        ),
    )


# How a probe's failure reads when it lacked the privileges (errno texts, BCC's message).
_DENIED = ("EPERM", "EACCES", "Operation not permitted", "Permission denied", "super-user")
UNPRIVILEGED_FIX = (
    "run as root first (see the privileges row): without them this probe is refused whatever "
    "the kernel supports; if it still fails as root: "
)


def run_checks(reqs: Sequence[Requirement]) -> list[CheckResult]:
    """Run every probe, in order; a failure never stops the following checks. Once the
    privileges are missing, a later probe refused for want of them says so first, instead of
    only pointing at kernel configuration it could not test."""
    results = []
    unprivileged = False
    for req in reqs:
        try:
            results.append(CheckResult(req.name, req.title, True, req.probe(), ""))
        except ProbeFailed as e:
            detail = str(e)
            fix = e.fix or req.fix
            if unprivileged and any(word in detail for word in _DENIED):
                fix = UNPRIVILEGED_FIX + fix
            unprivileged = unprivileged or req.name == "privileges"
            results.append(CheckResult(req.name, req.title, False, detail, fix))
    return results


def format_text(results: Sequence[CheckResult]) -> str:
    width = max(len(r.title) for r in results)
    lines = []
    for r in results:
        status = "ok  " if r.ok else "FAIL"
        lines.append(f"{status}  {r.title:<{width}}  {r.detail}")
        if not r.ok:
            lines.append(f"      {'':<{width}}  fix: {r.fix}")
    failed = sum(not r.ok for r in results)
    lines.append(
        "all requirements met" if not failed else f"{failed} of {len(results)} requirements not met"
    )
    return "\n".join(lines)


def format_json(results: Sequence[CheckResult]) -> str:
    return json.dumps(
        {"ok": all(r.ok for r in results), "checks": [asdict(r) for r in results]}, indent=2
    )


def _command(args: argparse.Namespace) -> int:
    results = run_checks(requirements())
    print(format_json(results) if args.json else format_text(results))
    sys.stdout.flush()
    return 0 if all(r.ok for r in results) else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "check",
        help="host preflight: can this machine run the mesh?",
        description="Probe every kernel feature and privilege the agent needs; exit 0 only "
        "when all are present. Mounts bpffs at /sys/fs/bpf if it is missing.",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_command)


__all__ = ["CheckResult", "ProbeFailed", "Requirement", "format_text", "requirements", "run_checks"]
