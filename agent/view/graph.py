"""The service graph of a ``Window``: workloads as nodes, source → destination edges (pure).

An edge carries both kinds of figures the view computes: TCP (``aggregate.Figures``, always,
since every request rides a connection) and HTTP (``golden.RequestFigures``, when the
destination's agent saw requests on it). What the dashboard shows follows from them:

* the **rate** is requests per second on an HTTP edge, connections opened per second otherwise;
* **denied** counts what a policy refused on the edge: connections closed with
  ``response_flags="DENY"`` (L4 AuthorizationPolicy or strict mTLS) plus requests answered
  with ``response_flags="RBAC"`` (L7); an edge with any is drawn as denied;
* **mTLS** is ``aggregate.mtls_word`` of the edge's connections.

Nodes are ``namespace/name`` workload names as the metrics label them (pods of one Deployment
are one node), including ``unknown/unknown`` for traffic from outside the mesh's state.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.view.aggregate import Figures, aggregate, mtls_word, pair
from agent.view.golden import RequestFigures, requests_by
from agent.view.series import Window


@dataclass(frozen=True)
class Edge:
    source: str
    destination: str
    tcp: Figures
    http: RequestFigures | None

    @property
    def protocol(self) -> str:
        return "http" if self.http is not None else "tcp"

    @property
    def rate(self) -> float:
        """Requests per second on an HTTP edge, connections opened per second on a TCP one."""
        return self.http.per_second if self.http is not None else self.tcp.opened_per_second

    @property
    def rate_unit(self) -> str:
        return "req/s" if self.http is not None else "conn/s"

    @property
    def denied(self) -> float:
        return self.tcp.denied + (self.http.denied if self.http is not None else 0.0)

    @property
    def mtls(self) -> str:
        return mtls_word(self.tcp)


@dataclass(frozen=True)
class Graph:
    nodes: tuple[str, ...]  # sorted
    edges: tuple[Edge, ...]  # sorted by (source, destination)
    seconds: float

    def inbound(self, node: str) -> tuple[Edge, ...]:
        return tuple(e for e in self.edges if e.destination == node)

    def outbound(self, node: str) -> tuple[Edge, ...]:
        return tuple(e for e in self.edges if e.source == node)


def build_graph(window: Window) -> Graph:
    """Every pair with traffic in the window (TCP busy or HTTP requests) as an edge."""
    tcp = aggregate(window, pair)
    http = requests_by(window, pair)
    edges = []
    for key in sorted(set(tcp) | set(http)):
        src, dst = key
        figures = tcp.get(key) or Figures(seconds=window.seconds)
        edges.append(Edge(src, dst, figures, http.get(key)))
    nodes = sorted({e.source for e in edges} | {e.destination for e in edges})
    return Graph(tuple(nodes), tuple(edges), window.seconds)
