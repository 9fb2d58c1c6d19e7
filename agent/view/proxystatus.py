"""Registers ``nodemesh proxy-status`` (``agent.admin.sync``) with a way to find a lab's agents.

The comparison and the command live in the admin layer, which may not import the lab (the
layers of ARCHITECTURE.md); this module sits above both and hands the lab's lookup in, as
``nodemesh top`` finds the lab's agents: every node's admin API, loopback in its namespace.
"""

from __future__ import annotations

import argparse
import functools

from agent.admin import sync


def lab_targets(lab: str) -> list[sync.Target] | None:
    """Every node's agent of ``lab`` (None: that lab is not up)."""
    from agent.lab import control, netns
    from agent.lab.topology import LabError

    try:
        _, plan = control.load(lab)
    except LabError:
        return None
    return [
        sync.Target(n.name, sync.DEFAULT_ADMIN, functools.partial(netns.enter, n.netns))
        for n in plan.nodes
    ]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sync.register(subparsers, lab_targets)
