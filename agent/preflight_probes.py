"""The host probes behind ``nodemesh check``: each does the smallest real thing and reports it.

Every probe returns a short description of what it observed, or raises ``Unsupported`` naming
what failed (with the kernel's errno text). They are deliberately independent of one another so
that one missing feature never hides the state of the others; the BCC compile that two probes
share is cached.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import platform
import resource
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.base.conncaps import MAX_NOFILE, process_cap
from agent.proxy import splicepipe

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE = 0
_MAP_TYPE_ARRAY, _MAP_TYPE_SOCKMAP = 2, 15
TC_INGRESS_PARENT = "ffff:fff2"
# Fewer connections per proxy process than this and a node's pods would be refused under
# ordinary load: the open-files row fails (a hard limit under about 3,500 descriptors).
MIN_CONNECTIONS = 1024

# The same steering the agent does: find the socket of a flow and assign the packet to it.
_TC_PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
int probe_assign(struct __sk_buff *skb) {
    struct bpf_sock_tuple tuple = {};
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
                                             BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        bpf_sk_assign(skb, sk, 0);
        bpf_sk_release(sk);
    }
    return TC_ACT_OK;
}
"""


class Unsupported(Exception):
    """The host lacks what a probe needs; the message says what was observed. ``fix``, when
    given, replaces the requirement's own (a probe that could not run says how to run it)."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.fix = fix


@contextlib.contextmanager
def _bcc_diagnostics() -> Iterator[list[str]]:
    """Take what BCC, clang and libbpf write straight to file descriptor 2 during a probe (the
    compiler's errors, ``bpf: Failed to load program: Operation not permitted``): printed,
    it would come before the report, apart from the row it explains. The list is filled when
    the block ends; a failing probe quotes it (``_with``)."""
    said: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            said += [line.strip() for line in text.splitlines() if line.strip()]


def _with(message: str, said: list[str], limit: int = 3) -> str:
    """``message`` and the first ``limit`` lines BCC said (``_bcc_diagnostics``), if any."""
    return f"{message} ({'; '.join(said[:limit])})" if said else message


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) for every mount this process sees."""
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return [(parts[1], parts[2]) for parts in (line.split() for line in f) if len(parts) > 2]


def _effective_caps() -> int:
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff")), 16)


def privileges(euid: int | None = None, cap_eff: int | None = None) -> str:
    """Root, or the three capabilities the agent uses; arguments default to this process.

    Root is judged by its effective capabilities too: in a container (the agent's pod: BPF,
    NET_ADMIN and SYS_RESOURCE) root has only those. The agent needs CAP_BPF and CAP_NET_ADMIN;
    CAP_SYS_ADMIN only this check does (its clsact probe's scratch network namespace)."""
    euid = os.geteuid() if euid is None else euid
    caps = _effective_caps() if cap_eff is None else cap_eff
    if euid == 0:
        lacking = [n for n, bit in (("CAP_BPF", CAP_BPF), ("CAP_NET_ADMIN", CAP_NET_ADMIN))
                   if not caps >> bit & 1]  # fmt: skip
        if lacking:
            raise Unsupported(f"root (uid 0) but missing {', '.join(lacking)}")
        if not caps >> CAP_SYS_ADMIN & 1:
            return (
                "running as root without CAP_SYS_ADMIN (as in the agent's pod): the agent does "
                "not need it, the clsact probe below does"
            )
        return "running as root"
    wanted = {"CAP_BPF": CAP_BPF, "CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_SYS_ADMIN": CAP_SYS_ADMIN}
    missing = [name for name, bit in wanted.items() if not caps >> bit & 1]
    if missing:
        raise Unsupported(f"not root (uid {euid}) and missing {', '.join(missing)}")
    return "not root, but CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN are effective"


def _create_map(map_type: int) -> None:
    """bpf(BPF_MAP_CREATE) of a one-entry map with 4-byte keys and values, then close it."""
    nr = _BPF_SYSCALL.get(platform.machine())
    if nr is None:
        raise Unsupported(f"unknown bpf() syscall number for {platform.machine()}")
    attr = ctypes.create_string_buffer(struct.pack("=IIII", map_type, 4, 4, 1), 128)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, _BPF_MAP_CREATE, attr, ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise Unsupported(
            f"bpf(BPF_MAP_CREATE) failed: {errno.errorcode.get(err)} {os.strerror(err)}"
        )
    os.close(fd)


def bpf_syscall() -> str:
    _create_map(_MAP_TYPE_ARRAY)
    return "created and closed an array map"


def sockmap() -> str:
    _create_map(_MAP_TYPE_SOCKMAP)
    return "created and closed a sockmap"


def bpffs(path: str = "/sys/fs/bpf") -> str:
    if (path, "bpf") in _mounts():
        return f"mounted at {path}"
    try:
        os.makedirs(path, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "bpf", "bpf", path], check=True, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise Unsupported(f"not mounted at {path} and mounting failed: {detail.strip()}") from e
    return f"was not mounted: mounted it at {path}"


def cgroup2() -> str:
    points = [mp for mp, fstype in _mounts() if fstype == "cgroup2"]
    if not points:
        raise Unsupported("no cgroup2 filesystem mounted")
    return f"mounted at {points[0]}"


def bcc_module() -> str:
    try:
        import bcc
    except ImportError as e:
        raise Unsupported(f"import bcc failed: {e}") from e
    return f"{Path(bcc.__file__).parent}"


def kernel_headers() -> str:
    build = Path("/lib/modules") / platform.release() / "build"
    if not (build / "include").is_dir():
        raise Unsupported(f"{build} is missing or has no include/ (BCC compiles against it)")
    return f"{build} -> {build.resolve()}"


@functools.cache
def _tc_program() -> Any:
    """Compile and load the probe program once; (BPF object, function) or the error."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise Unsupported(f"import bcc failed: {e}") from e
    failure: Exception | None = None
    with _bcc_diagnostics() as said:
        try:
            bpf = BPF(text=_TC_PROGRAM.encode())
            return bpf, bpf.load_func("probe_assign", BPF.SCHED_CLS)
        except Exception as e:  # BCC raises bare Exception for compile and verifier failures
            failure = e
    message = f"loading a tc program calling bpf_sk_assign failed: {failure}"
    raise Unsupported(_with(message, said)) from failure


def sk_assign() -> str:
    _tc_program()
    return "loaded a tc program calling bpf_skc_lookup_tcp + bpf_sk_assign"


def clsact_cls_bpf() -> str:
    """Attach the probe program at clsact ingress of a veth in a scratch netns, then remove it."""
    from pyroute2 import IPRoute, netns
    from pyroute2.netlink.exceptions import NetlinkError

    _, fn = _tc_program()
    name = f"nmcheck-{secrets.token_hex(4)}"
    try:
        netns.create(name)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            raise Unsupported(
                f"not probed: creating a scratch network namespace was refused ({e}), which "
                "needs CAP_SYS_ADMIN (the agent itself does not)",
                "run nodemesh check on the node as root with every capability, e.g. sudo "
                "nodemesh check (not in the agent's pod, which lacks CAP_SYS_ADMIN); the agent's "
                "own start-up proves clsact on the node: its log says datapath ready",
            ) from e
        raise Unsupported(f"cannot create a scratch network namespace: {e}") from e
    step = "create a veth pair"
    try:
        with IPRoute(netns=name) as ipr:
            ipr.link("add", ifname="probe0", kind="veth", peer="probe1")
            index = ipr.link_lookup(ifname="probe0")[0]
            step = "add a clsact qdisc"
            ipr.tc("add", "clsact", index)
            step = "attach a direct-action cls_bpf filter"
            ipr.tc(
                "add-filter",
                "bpf",
                index,
                ":1",
                fd=fn.fd,
                name=fn.name,
                parent=TC_INGRESS_PARENT,
                classid=1,
                direct_action=True,
            )
    except NetlinkError as e:
        raise Unsupported(f"could not {step}: {os.strerror(e.code)}") from e
    finally:
        netns.remove(name)
    return "attached a direct-action filter at clsact ingress in a scratch netns"


def ip_transparent() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        except OSError as e:
            raise Unsupported(f"setsockopt(IP_TRANSPARENT) failed: {e.strerror}") from e
    return "set on a TCP socket"


# The same-node splice's mechanism (agent/datapath/bpf/splice.bpf.c), in miniature.
_SPLICE_PROGRAM = r"""
#include <uapi/linux/bpf.h>
BPF_SOCKHASH(probe_splice_hash, u64, 2);
int probe_splice(struct __sk_buff *skb) {
    u64 key = 0;
    return probe_splice_hash.sk_redirect_hash(skb, &key, 0);
}
"""


def splice() -> str:
    """Optional: never raises. Loads an sk_skb verdict redirecting through a sockhash, attaches
    it to the sockhash and puts an established loopback socket in it, as the splice does."""
    try:
        import bcc  # noqa: F401 (only whether it imports)
    except ImportError as e:
        return f"unavailable (optional; import bcc failed: {e})"
    with _bcc_diagnostics() as said:
        reason = _splice_failure()
    if reason is not None:
        return _no_splice(_with(reason, said))
    return "available: sk_skb stream verdict on a sockhash (nodemesh agent --splice)"


def relay_splice() -> str:
    """Optional: never raises. Splices a message TCP -> pipe -> TCP as the relay does
    (``agent.proxy.splicepipe``)."""
    return splicepipe.probe()


def _splice_failure() -> str | None:
    """Why the splice's mechanism does not work here, or None when it does."""
    from bcc import BPF, BPFAttachType, libbcc

    try:
        bpf = BPF(text=_SPLICE_PROGRAM.encode())
    except Exception as e:  # BCC raises bare Exception for compile failures
        return f"compiling the probe failed: {e}"
    try:
        fn = bpf.load_func(b"probe_splice", BPF.SK_SKB)
        fd = libbcc.lib.bpf_table_fd(bpf.module, b"probe_splice_hash")
        BPF.attach_func(fn, fd, BPFAttachType.SK_SKB_STREAM_VERDICT)
        with (
            socket.create_server(("127.0.0.1", 0)) as server,
            socket.create_connection(server.getsockname()) as client,
        ):
            key, value = ctypes.c_uint64(0), ctypes.c_int(client.fileno())
            rc = libbcc.lib.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0)
            if rc != 0:
                return f"adding a TCP socket to a sockhash failed ({rc})"
    except Exception as e:  # BCC raises bare Exception for verifier and attach failures
        return str(e)
    finally:
        bpf.cleanup()
    return None


def _no_splice(reason: str) -> str:
    return (
        f"unavailable (optional): {reason}; same-node connections are relayed in user space "
        "(needs CONFIG_BPF_STREAM_PARSER and Linux >= 5.8)"
    )


def capture_failure_mode() -> str:
    """Not a host requirement: what the agent does with meshed pods' traffic while its proxy is
    absent (restart, crash), so an operator sees the choice next to the host checks."""
    from dataclasses import fields

    from agent.config import AgentConfig
    from agent.datapath.datapath import pinned_failure_modes

    try:
        running = pinned_failure_modes()
    except OSError:  # no bpffs or no privileges: the rows above say so
        running = {}
    live = "".join(f"; agent {pins}: {mode}" for pins, mode in running.items())
    fail_open = next(f.default for f in fields(AgentConfig) if f.name == "fail_open")
    if fail_open:
        return "fail-open by default: uncaptured while no proxy listens" + live
    return (
        "fail-closed by default: meshed pods' new connections are dropped (and retried by TCP) "
        "while no proxy listens; `nodemesh agent --fail-open` lets them through unencrypted" + live
    )


def open_files() -> str:
    """How many connections each proxy process will admit (``agent.base.conncaps``). The agent
    raises its soft ``RLIMIT_NOFILE`` to the hard one at start, so the hard limit this command
    runs under (the shell's, a unit's ``LimitNOFILE``, the container runtime's ``nofile``) is
    what counts; a soft limit of 1,024 under it is normal and harmless."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    limit = MAX_NOFILE if hard == infinite else min(hard, MAX_NOFILE)
    shown = ["unlimited" if v == infinite else f"{v:,}" for v in (soft, hard)]
    cap = process_cap(limit)
    detail = (
        f"soft {shown[0]}, hard {shown[1]}: each proxy process admits up to {cap:,} "
        "connections at once (nodemesh agent --max-connections auto)"
    )
    if cap < MIN_CONNECTIONS:
        raise Unsupported(f"{detail}, fewer than {MIN_CONNECTIONS:,}")
    return detail
