"""CPU per gRPC unary call through both node proxies when the VIP's port has an HTTPRoute:
``bench_grpc_cpu vip`` with the bench lab's route (``bench_http_cpu.ROUTE``: a header match the
calls do not meet, then a 90/10 split over two Services selecting the same pod, with retries)
attached to its Service, so the difference between the two is what routing a call costs.

    sudo .venv/bin/python -m tests.bench.proxy.bench_grpc_routed vip \
        [--calls 4000] [--rounds 5] [--connections 4] [--callgrind] ...

The same harness, options and output as ``bench_grpc_cpu`` (its ``main``); only the state
differs: Service ``echo`` is the route's parent, and its backends, Services ``web-v1`` and
``web-v2``, declare the same gRPC port.
"""

from __future__ import annotations

from dataclasses import replace

from agent.state import Endpoint, Service, ServicePort
from tests.bench.proxy import bench_grpc_cpu
from tests.bench.proxy.bench_http_cpu import ROUTE, ROUTE_BACKENDS
from tests.integration.proxy.mesh import SERVER, Mesh

_declare = bench_grpc_cpu._declare


def routed(mesh: Mesh, path: str, port: int, l4_port: int) -> tuple[str, int]:
    """``bench_grpc_cpu``'s Service, with the route attached and its two backends."""
    dst = _declare(mesh, path, port, l4_port)
    grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
    parent = {"group": "", "kind": "Service", "name": "echo", "port": 50051}
    rules = [
        {**rule, "backendRefs": [{**ref, "port": 50051} for ref in rule["backendRefs"]]}
        for rule in ROUTE.spec["rules"]
    ]
    with mesh.store.update() as tx:
        for name in ROUTE_BACKENDS:
            tx.put_service(Service(name, "default", (), (grpc,), {"app": "server"},
                                   (Endpoint(SERVER),)))  # fmt: skip
        tx.put_route(replace(ROUTE, spec={"parentRefs": [parent], "rules": rules}))
    return dst


if __name__ == "__main__":
    bench_grpc_cpu._declare = routed
    bench_grpc_cpu.main()
