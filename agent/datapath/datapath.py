"""The datapath as the agent sees it: start (adopt or load), register listeners, reconcile
state changes into the kernel, report counters and status, uninstall.

Order matters for "no connection escapes capture":
  1. programs and maps are adopted (or loaded), routing is ensured;
  2. the agent's listeners are put in the listener SOCKMAP (until then, SYNs of meshed pods are
     dropped by the programs: fail closed, and TCP retries them);
  3. the reconciler writes pod entries *before* it attaches filters, so a program never runs
     on an interface without the entries it needs; filters are replaced in place.
Joining or leaving the mesh only rewrites a map entry; programs are never reloaded for it.

All kernel calls are synchronous; the agent calls them from a worker thread, one at a time
(``_lock``). Maps are read and written here through libbpf; routing and tc (pyroute2) go through
the netlink helper child (``agent.datapath.netlink``), started with the programs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.base.constants import Listener
from agent.datapath import bpfsys, programs
from agent.datapath.desired import LocalPod, Plan, plan
from agent.datapath.layout import (
    SETTING_FAIL_OPEN,
    AddrKey,
    Counter,
    LayoutError,
    PodEntry,
    PodValue,
    Program,
    SettingsValue,
    addr_key,
    counter_index,
    pod_entry,
    pod_value,
)
from agent.datapath.netlink import NetlinkHelper, RoutingConfig
from agent.datapath.splice import KernelSplice

log = logging.getLogger(__name__)

PROGRAM_FOR_ROLE = {"pod": Program.POD_INGRESS, "uplink": Program.UPLINK_INGRESS}


@dataclass(frozen=True)
class DatapathConfig:
    pin_dir: Path
    uplinks: tuple[str, ...] = ()
    fail_open: bool = False
    marks: programs.Marks = field(default_factory=programs.Marks)
    routing: RoutingConfig = field(default_factory=RoutingConfig)


class SpliceUnavailable(RuntimeError):
    """This kernel (or the pinned generation) cannot splice same-node connections."""


class Datapath:
    """The kernel side of one agent. Create, ``start()``, then ``reconcile()`` on changes."""

    def __init__(self, config: DatapathConfig) -> None:
        self.config = config
        self._loaded: programs.Loaded | None = None
        self._lock = threading.Lock()
        self._listeners: dict[Listener, int] = {}
        self._swapped = False
        self._frozen = False
        self._netlink: NetlinkHelper | None = None
        self.last_plan = Plan()

    @property
    def loaded(self) -> programs.Loaded:
        if self._loaded is None:
            raise RuntimeError("Datapath.start() has not run")
        return self._loaded

    def splice(self) -> KernelSplice:
        """The same-node splice maps of the loaded generation. Raises ``SpliceUnavailable``
        with the reason when the kernel refused the splice program."""
        reason = self.loaded.splice_unavailable
        if reason is not None:
            raise SpliceUnavailable(reason)
        m = self.loaded.maps
        return KernelSplice(
            m["nm_splice_links"],
            m["nm_splice_credits"],
            m["nm_splice_targets"],
            m["nm_splice_sources"],
        )

    def start(self) -> None:
        with self._lock:
            self._loaded = programs.load(self.config.pin_dir, self.config.marks)
            settings = SettingsValue(flags=SETTING_FAIL_OPEN if self.config.fail_open else 0)
            self.loaded.maps["nm_settings"].update(ctypes.c_uint32(0), settings)
            self._netlink = NetlinkHelper(keep_fds=list(self.loaded.programs.values()))
            for change in self.netlink.call(
                "ensure_routing", routing_config=self.config.routing.as_args()
            ):
                log.info("datapath: added %s", change)
            log.info(
                "datapath ready: generation %s (%s), fail-%s",
                self.loaded.generation,
                "adopted" if self.loaded.adopted else "new",
                "open" if self.config.fail_open else "closed",
            )

    @property
    def netlink(self) -> NetlinkHelper:
        if self._netlink is None:
            raise RuntimeError("Datapath.start() has not run")
        return self._netlink

    def register_listeners(self, listeners: dict[Listener, socket.socket]) -> None:
        """Put the agent's listening sockets in the SOCKMAP: from now on SYNs are captured."""
        with self._lock:
            sockmap = self.loaded.maps["nm_listeners"]
            for slot, sock in listeners.items():
                sockmap.update(ctypes.c_uint32(int(slot)), ctypes.c_uint32(sock.fileno()))
                self._listeners[slot] = sock.getsockname()[1]
            log.info(
                "datapath: listeners registered %s", {s.name: p for s, p in self._listeners.items()}
            )

    def unregister_listeners(self) -> None:
        """Take the listeners out (drain): new SYNs then fail closed (or open) while existing
        flows keep their sockets."""
        with self._lock:
            for slot in Listener:
                self.loaded.maps["nm_listeners"].delete(ctypes.c_uint32(int(slot)))
            self._listeners.clear()

    def freeze(self) -> None:
        """Stop writing to the kernel: a successor agent is taking the node over (see
        ``agent.handover``). Returns once a reconcile pass under way has finished."""
        with self._lock:
            self._frozen = True
        log.info("datapath: frozen; another agent takes over the maps and filters")

    def resume(self) -> None:
        """Write again after a handover that did not complete: the next pass re-attaches every
        filter to this agent's programs (the successor may have swapped some)."""
        with self._lock:
            self._frozen = False
            self._swapped = False
        log.info("datapath: resumed")

    def _current_entries(self) -> dict[str, PodEntry]:
        pods = self.loaded.maps["nm_pods"]
        entries = {}
        for key in list(pods.keys(AddrKey)):
            value = PodValue()
            if pods.lookup_into(key, value):
                entry = pod_entry(key, value)
                entries[entry.ip] = entry
        return entries

    def reconcile(self, pods: Sequence[LocalPod]) -> Plan:
        """Bring maps and filters in line with this node's ``pods``; logs and returns what
        changed. A frozen datapath changes nothing (another agent owns the kernel state)."""
        with self._lock:
            if self._frozen:
                return Plan()
            return self._reconcile(pods)

    def _reconcile(self, pods: Sequence[LocalPod]) -> Plan:
        current = self._current_entries()
        seen = self.netlink.call(
            "observe", pods=[p.ip for p in pods], uplinks=list(self.config.uplinks)
        )
        ifaces: dict[str, int | None] = seen["ifaces"]
        attached = {int(i): str(name) for i, name in seen["attached"].items()}
        if not self._swapped:
            # First pass of this process: re-attach everywhere, so interfaces still running
            # an older generation's programs move to ours (replace is atomic per filter).
            attached = dict.fromkeys(attached, "")
        uplinks = {int(i): str(name) for i, name in seen["uplinks"].items()}
        todo = plan(pods, ifaces.get, current, attached, uplinks)
        self._apply(todo)
        if not self._swapped:
            for gen in programs.remove_other_generations(
                self.config.pin_dir, self.loaded.generation
            ):
                log.info("datapath: removed old pinned generation %s", gen)
            self._swapped = True
        self.last_plan = todo
        return todo

    def _apply(self, todo: Plan) -> None:
        pods = self.loaded.maps["nm_pods"]
        for entry in todo.put:
            try:
                value = pod_value(entry)
            except LayoutError as e:
                # Capture everything rather than leak: the pod keeps its membership and loses
                # its exemptions until the annotation fits.
                log.error("datapath: pod %s programmed without port exemptions: %s", entry.ip, e)
                value = pod_value(
                    dataclasses.replace(
                        entry, exclude_outbound=frozenset(), exclude_inbound=frozenset()
                    )
                )
            pods.update(addr_key(entry.ip), value)
            log.info(
                "datapath: pod %s %s (if %d, exempt out %s in %s)",
                entry.ip,
                "meshed" if entry.meshed else "local, not meshed",
                entry.ifindex,
                sorted(entry.exclude_outbound),
                sorted(entry.exclude_inbound),
            )
        attach = [
            (ifindex, self.loaded.programs[prog], programs.FUNCTIONS[prog])
            for role, ifaces in (("pod", todo.attach_pod), ("uplink", todo.attach_uplink))
            for prog in (PROGRAM_FOR_ROLE[role],)
            for ifindex in ifaces
        ]
        if attach or todo.detach:
            done = self.netlink.call("apply", attach=attach, detach=list(todo.detach))
            failed = dict(done["failed"])
            for ifindex, _, name in attach:
                if ifindex in failed:
                    log.warning("datapath: %s", failed[ifindex])
                else:
                    log.info("datapath: attached %s to interface %d", name, ifindex)
            for ifindex in done["detached"]:
                log.info("datapath: detached from interface %d", ifindex)
        for ip in todo.delete:
            pods.delete(addr_key(ip))
            log.info("datapath: pod %s removed", ip)
        for ip in todo.unresolved:
            log.warning("datapath: no route to local pod %s: its interface is not up yet", ip)

    def counters(self) -> dict[str, dict[str, int]]:
        """Per-program counters, summed over CPUs: {"pod_ingress": {"captured": n, ...}}."""
        m = self.loaded.maps["nm_counters"]
        return {
            p.name.lower(): {
                c.name.lower(): bpfsys.percpu_sum(m, counter_index(p, c)) for c in Counter
            }
            for p in Program
        }

    def program_stats(self) -> dict[str, dict[str, int]]:
        """run_cnt and run_time_ns per program (they grow only with kernel.bpf_stats_enabled)."""
        result = {}
        for p, fd in self.loaded.programs.items():
            prog_id, _, run_ns, run_cnt = bpfsys.prog_stats(fd)
            result[p.name.lower()] = {"id": prog_id, "run_time_ns": run_ns, "run_cnt": run_cnt}
        return result

    def status(self) -> dict[str, object]:
        return {
            "generation": self.loaded.generation,
            "adopted": self.loaded.adopted,
            "pin_dir": str(self.config.pin_dir),
            "failure_mode": "fail-open" if self.config.fail_open else "fail-closed",
            "listeners": {s.name.lower(): p for s, p in self._listeners.items()},
            "pods": len(self._current_entries()),
            "counters": self.counters(),
        }

    def attachments(self) -> dict[str, str]:
        """Interface name → our program on it (a blocking call: from a worker thread)."""
        found = {int(i): str(name) for i, name in self.netlink.call("attached").items()}
        return {_ifname(index): prog for index, prog in sorted(found.items())}

    def close(self) -> None:
        """Release file descriptors and stop the netlink helper; pinned objects and filters stay
        for the next agent."""
        with self._lock:
            if self._netlink is not None:
                self._netlink.close()
                self._netlink = None
            if self._loaded is not None:
                self._loaded.close()
                self._loaded = None


def _ifname(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:  # removed since the dump
        return f"ifindex {index}"


def uninstall(pin_dir: Path, routing_config: RoutingConfig) -> list[str]:
    """Remove every filter, rule, route and pinned object an agent with these settings created
    in the current network namespace; returns what was removed."""
    helper = NetlinkHelper()
    try:
        removed: list[str] = helper.call("uninstall", routing_config=routing_config.as_args())
    finally:
        helper.close()
    if programs.remove_all(pin_dir):
        removed.append(f"pinned objects under {pin_dir}")
    return removed


def pinned_failure_modes(root: Path = Path("/sys/fs/bpf/nodemesh")) -> dict[str, str]:
    """The failure mode each agent pinned under ``root`` runs with, by pin directory name
    (read from its settings map, so it is what the programs do, not what a flag said)."""
    modes = {}
    for path in sorted(root.glob("*/*/map_nm_settings")):
        settings = bpfsys.Map(bpfsys.open_pinned(str(path)), "nm_settings")
        try:
            value = SettingsValue()
            settings.lookup_into(ctypes.c_uint32(0), value)
        finally:
            settings.close()
        fail_open = value.flags & SETTING_FAIL_OPEN
        modes[path.parent.parent.name] = "fail-open" if fail_open else "fail-closed"
    return modes
