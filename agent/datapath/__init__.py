"""The capture datapath: eBPF programs on pod veths and uplinks, their pinned maps, policy
routing, transparent listeners and the reconciler that keeps the kernel in step with the state.

This package is the only one that imports ``bcc`` and ``pyroute2``; within it only ``compiler``
imports ``bcc``, and that module runs as a short-lived child process, so the agent itself never
maps LLVM. See ARCHITECTURE.md
("Datapath") for programs, maps, marks, tables and the fail-closed behaviour; the C sources are
in ``agent/datapath/bpf/`` (installed as package data).
"""
