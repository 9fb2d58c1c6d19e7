"""The capture datapath: eBPF programs on pod veths and uplinks, their pinned maps, policy
routing, transparent listeners and the reconciler that keeps the kernel in step with the state.

This package is the only one that imports ``bcc`` and ``pyroute2``, and only in child processes
of the agent: ``compiler`` (``bcc``, short-lived, so the agent never maps LLVM) and the netlink
helper ``netlinkd`` with ``routing`` and ``tc`` (``pyroute2``, persistent). See ARCHITECTURE.md
("Datapath") for programs, maps, marks, tables and the fail-closed behaviour; the C sources are
in ``agent/datapath/bpf/`` (installed as package data).
"""
