"""``nodemesh dashboard``: the central view as a web page (the I/O shell).

Why the standard library's ``ThreadingHTTPServer`` and not ``agent.base.http`` or a framework:
every page is built from blocking reads (Prometheus over ``urllib``, the lab's namespaces
entered by a thread), one person looks at it, and two routes need no routing library. A thread
per request keeps a slow Prometheus from stalling another tab; ``agent.base.http`` serves the
agent's event loop and joins a ``SO_REUSEPORT`` group on purpose, which a second dashboard on
the same port must not do silently.

Per page: one Prometheus query per metric family (``sources.PrometheusSource.window``); the
index needs the last ``window`` seconds, a workload page the last ``range`` seconds, which its
charts cut into ``points`` steps and whose end is also its edges' window. A workload page reads
the agents' admin APIs (``/workloads``, ``/policies``, ``/certs``); an agent that does not
answer is named on the page, the rest of the page still shows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from agent.view.aggregate import TCP_FAMILIES
from agent.view.golden import REQUEST_FAMILIES
from agent.view.graph import build_graph
from agent.view.inventory import AgentAnswer, workload_info
from agent.view.pages import Context, error_page, index_page, workload_page
from agent.view.series import ViewError, Window
from agent.view.sources import Runner, Source, direct, http_get
from agent.view.timeline import golden_charts

log = logging.getLogger(__name__)

FAMILIES = (*TCP_FAMILIES, *REQUEST_FAMILIES)


@dataclass(frozen=True)
class Admin:
    """One agent's admin API (``http://127.0.0.1:15000`` on its node), and how to reach it."""

    name: str  # how the page names it: the node in a lab, else the address
    url: str
    runner: Runner = direct

    def read(self) -> AgentAnswer:
        try:
            got = {
                path: json.loads(http_get(f"{self.url.rstrip('/')}/{path}", self.runner))
                for path in ("workloads", "policies", "certs")
            }
        except (ViewError, ValueError) as e:
            return AgentAnswer(self.name, error=str(e))
        return AgentAnswer(
            self.name,
            workloads=got["workloads"].get("workloads", []),
            policies=got["policies"].get("policies", []),
            certificates=got["certs"].get("certificates", []),
        )


@dataclass
class Dashboard:
    source: Source
    admins: Sequence[Admin]
    window_seconds: float = 60.0
    range_seconds: float = 600.0
    points: int = 60
    refresh_seconds: int = 10

    def context(self) -> Context:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return Context(self.source.describe(), self.window_seconds, now, self.refresh_seconds)

    def render(self, target: str) -> tuple[int, str]:
        """(HTTP status, HTML) of ``target`` (a request's path and query)."""
        url = urlsplit(target)
        try:
            if url.path == "/":
                window = self.source.window(self.window_seconds, FAMILIES)
                return 200, index_page(build_graph(window), self.context())
            if url.path == "/workload":
                names = parse_qs(url.query).get("name")
                if not names:
                    return 400, error_page("/workload?name=NAMESPACE/NAME", self.context())
                return 200, self.workload(names[-1])
        except ViewError as e:
            return 502, error_page(str(e), self.context())
        return 404, error_page(f"no page {url.path}; the graph is at /", self.context())

    def workload(self, name: str) -> str:
        span = max(self.range_seconds, self.window_seconds)
        whole = self.source.window(span, FAMILIES)
        recent = Window(whole.end - self.window_seconds, whole.end, whole.families)
        charts = golden_charts(
            Window(whole.end - self.range_seconds, whole.end, whole.families), name, self.points
        )
        info = workload_info(name, [a.read() for a in self.admins])
        return workload_page(name, build_graph(recent), charts, info, self.context())


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard  # set on the subclass made by ``serve``

    def do_GET(self) -> None:
        status, text = self.dashboard.render(self.path)
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def server(dashboard: Dashboard, host: str, port: int) -> ThreadingHTTPServer:
    """A bound server for ``dashboard`` (``port=0`` picks one); ``serve_forever`` runs it."""
    handler = type("Handler", (_Handler,), {"dashboard": dashboard})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    return httpd
