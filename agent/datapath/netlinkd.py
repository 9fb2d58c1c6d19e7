"""The netlink helper: ``python -m agent.datapath.netlinkd``, the one process that imports pyroute2
for the agent (its protocol and its reasons are in ``agent.datapath.netlink``).

It reads one request per line on stdin and answers each on stdout, until stdin closes (the
agent exited or closed it). Each request opens its own netlink socket (``IPRoute``), as the
agent did before the helper existed. The operations are the kernel half of the datapath:

* ``ensure_routing`` / ``uninstall``: the capture rule and route (``routing``), and for
  ``uninstall`` every filter of ours (``tc``); they return what they changed, for the log;
* ``observe``: what the reconciler plans from: each pod IP's interface, the interfaces carrying
  our filter, and the uplinks (named, or found); interface indexes are JSON object keys, so
  they travel as strings;
* ``apply``: attach programs (by file descriptor, inherited from the agent) and detach ours;
  a failed attach is reported per interface (the reconciler logs it and goes on), as before;
* ``attached``: the interfaces carrying our filter (the admin API's ``/datapath``).

SIGINT is ignored: a Ctrl-C at the agent's terminal reaches the whole process group, and the
agent drains after it, so the helper must outlive it until its stdin closes.
"""

from __future__ import annotations

import json
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.datapath import routing, tc
from agent.datapath.netlink import AttachError, RoutingConfig


def ensure_routing(ipr: IPRoute, routing_config: dict[str, int]) -> list[str]:
    return routing.ensure(ipr, RoutingConfig(**routing_config))


def uninstall(ipr: IPRoute, routing_config: dict[str, int]) -> list[str]:
    removed = []
    for ifindex, name in tc.attached_interfaces(ipr).items():
        if tc.detach(ipr, ifindex):
            removed.append(f"tc filter {name} on interface {ifindex}")
    return removed + routing.remove(ipr, RoutingConfig(**routing_config))


def observe(ipr: IPRoute, pods: list[str], uplinks: list[str]) -> dict[str, Any]:
    ifaces = {ip: routing.interface_of(ipr, ip) for ip in pods}
    pod_ifaces = {i for i in ifaces.values() if i is not None}
    return {
        "ifaces": ifaces,
        "attached": tc.attached_interfaces(ipr),
        "uplinks": routing.uplinks(ipr, tuple(uplinks), pod_ifaces),
    }


def apply(ipr: IPRoute, attach: list[tuple[int, int, str]], detach: list[int]) -> dict[str, Any]:
    attached, failed = [], []
    for ifindex, prog_fd, name in attach:
        try:
            tc.attach(ipr, ifindex, prog_fd, name)
        except AttachError as e:
            failed.append([ifindex, str(e)])
            continue
        attached.append(ifindex)
    detached = [ifindex for ifindex in detach if tc.detach(ipr, ifindex)]
    return {"attached": attached, "failed": failed, "detached": detached}


def attached(ipr: IPRoute) -> dict[int, str]:
    return tc.attached_interfaces(ipr)


OPERATIONS: dict[str, Callable[..., Any]] = {
    "ensure_routing": ensure_routing,
    "uninstall": uninstall,
    "observe": observe,
    "apply": apply,
    "attached": attached,
}


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """The reply to one request: ``{"ok": result}`` or ``{"error": {...}}``."""
    op = OPERATIONS.get(request.get("op", ""))
    if op is None:
        return {
            "error": {"kind": "internal", "message": f"unknown operation {request.get('op')!r}"}
        }
    try:
        with IPRoute() as ipr:
            return {"ok": op(ipr, **request.get("args", {}))}
    except (KeyError, IndexError) as e:  # LookupErrors, but from a bug, not a missing uplink
        return _internal(e)
    except LookupError as e:
        return {"error": {"kind": "LookupError", "message": str(e)}}
    except AttachError as e:
        return {"error": {"kind": "AttachError", "message": str(e)}}
    except NetlinkError as e:
        return {"error": {"kind": "OSError", "errno": e.code, "message": f"netlink: {e}"}}
    except OSError as e:
        return {"error": {"kind": "OSError", "errno": e.errno, "message": str(e)}}
    except Exception as e:
        return _internal(e)


def _internal(e: Exception) -> dict[str, Any]:
    """A bug here: reported to the agent with where it happened."""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {where.filename}:{where.lineno}" if where else ""
    return {"error": {"kind": "internal", "message": f"{e!r}{at}"}}


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin.buffer:
        reply = answer(json.loads(line))
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
