"""Gateway API routes for the mesh (GAMMA): HTTPRoute and GRPCRoute attached to Services.

Sans-IO, like the rest of ``agent.policy``: the state holds each route as written
(``agent.state.model.RouteObject``); this package compiles it (``compile``: all of a route or
none of it), decides per parent whether it is programmed and why (``parents``), orders every
attached match by the Gateway API's precedence (``table``), applies the filters that change a
request head (``filters``) and shapes ``status.parents`` (``status``).

The data path keeps a ``RouteTableCache``; per route table and (Service port, client namespace)
it asks ``cache.get(snapshot).port(service, port, client_namespace)`` once, then per request
that ``PortRoutes``' ``.http(request)`` or ``.grpc(call)``, which keeps the decision per request
shape (``decisions``) and answers as ``RouteTable.http``/``.grpc`` would.
"""

from agent.policy.routes.compile import Rejected, RouteError, compile_route
from agent.policy.routes.filters import (
    for_backend,
    modify_headers,
    redirect_location,
    rewrite_request,
)
from agent.policy.routes.model import (
    GRPC_ROUTE,
    HTTP_ROUTE,
    ROUTE_KINDS,
    Backend,
    Decision,
    GrpcRequest,
    HttpRequest,
    NoMatchingRule,
    RouteAction,
)
from agent.policy.routes.parents import ParentVerdict
from agent.policy.routes.status import CONTROLLER_NAME, merged_parents
from agent.policy.routes.table import RouteTable, RouteTableCache, choose_backend

__all__ = [
    "CONTROLLER_NAME",
    "GRPC_ROUTE",
    "HTTP_ROUTE",
    "ROUTE_KINDS",
    "Backend",
    "Decision",
    "GrpcRequest",
    "HttpRequest",
    "NoMatchingRule",
    "ParentVerdict",
    "Rejected",
    "RouteAction",
    "RouteError",
    "RouteTable",
    "RouteTableCache",
    "choose_backend",
    "compile_route",
    "for_backend",
    "merged_parents",
    "modify_headers",
    "redirect_location",
    "rewrite_request",
]
