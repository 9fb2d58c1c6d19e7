"""nodemesh: a sidecarless service mesh for Kubernetes.

The package is split by domain concept (see ARCHITECTURE.md): ``state`` is the single source of
truth, ``sources`` are its only writers, and everything else (datapath, identity, proxy, policy,
telemetry, admin, lab) reads it.
"""

__version__ = "0.1.0"
