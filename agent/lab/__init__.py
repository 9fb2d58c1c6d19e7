"""The lab: a small "cluster" of nodes and pods built from network namespaces on one machine.

``topology`` plans names and addresses from a cluster document, ``build`` creates and removes
the namespaces and links, ``components`` runs the mesh processes (CA, one agent per node),
``control`` strings them together for ``nodemesh lab up/down/status/...`` (``cli``), ``handle``
drives a lab from tests and benchmarks, and ``demo`` is ``make demo``.
"""
