"""The dashboard's HTML pages: the mesh's graph, and one page per workload (pure, text out).

Each page is complete on its own: inline CSS, server-drawn SVG (``agent.view.svg``), and a few
lines of inline JavaScript that fetch the same URL every ``refresh`` seconds and swap the
``<main>`` element, so the page stays live without a reload's flicker and keeps working (just
not refreshing) with JavaScript off. Every value from the mesh is escaped (``svg.esc``).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.view.graph import Edge, Graph
from agent.view.inventory import WorkloadInfo
from agent.view.layout import layout
from agent.view.svg import chart_svg, esc, graph_svg, millis, number, percent
from agent.view.timeline import Chart

STYLE = """
body{font-family:"DejaVu Sans",Verdana,sans-serif;margin:0;color:#222;background:#fafbfc}
header{background:#1f4e79;color:#fff;padding:10px 20px}
header a{color:#fff}
header h1{font-size:20px;margin:0 0 4px}
header p{margin:0;font-size:13px;opacity:.9}
main{padding:12px 20px}
h2{font-size:16px;margin:18px 0 8px;border-bottom:1px solid #ccd;padding-bottom:3px}
table{border-collapse:collapse;font-size:13px;margin-bottom:8px}
th,td{border:1px solid #d8dde3;padding:3px 8px;text-align:left;vertical-align:top;
max-width:30em;overflow-wrap:break-word}
th{background:#eef1f5}
td.num{text-align:right}
tr.denied td{color:#b00000;font-weight:bold}
.graph text{font-size:11px}
.graph .node-name{font-size:13px;font-weight:bold;fill:#1f4e79}
.graph .node-namespace{fill:#567}
.graph a:hover rect{fill:#d6e6f7}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #d8dde3;margin:0;padding:6px}
.chart figcaption{font-size:13px;font-weight:bold}
.chart .tick{font-size:10px;fill:#555}
.legend{font-size:11px}
.key{margin-right:10px;white-space:nowrap}
.swatch{display:inline-block;width:10px;height:10px;margin-right:3px}
.empty,.note{color:#666;font-style:italic;font-size:13px}
.error{color:#b00000;font-size:13px}
pre{font-size:11px;margin:0;white-space:pre-wrap}
"""

REFRESH_SCRIPT = """
<script>
setInterval(async () => {
  try {
    const answer = await fetch(location.href, {cache: "no-store"});
    if (!answer.ok) return;
    const page = new DOMParser().parseFromString(await answer.text(), "text/html");
    document.querySelector("main").replaceWith(page.querySelector("main"));
    document.querySelector("header p").replaceWith(page.querySelector("header p"));
  } catch (e) {}
}, %d);
</script>
"""


@dataclass(frozen=True)
class Context:
    """What every page states about itself: the data's origin, the window and the time."""

    source: str
    window_seconds: float
    generated: str  # e.g. "12:00:03 UTC"
    refresh_seconds: int


URL_SAFE = frozenset(string.ascii_letters + string.digits + "-._~/")


def url_quote(text: str) -> str:
    """Percent-encoding of a query value (RFC 3986: unreserved characters and ``/`` stay)."""
    return "".join(c if c in URL_SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def workload_href(name: str) -> str:
    return "/workload?name=" + url_quote(name)


def page(title: str, heading: str, context: Context, body: str) -> str:
    subtitle = (
        f"{esc(context.source)} · rates over the last {context.window_seconds:g}s · "
        f"{esc(context.generated)} · refreshes every {context.refresh_seconds}s"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{heading}</h1><p>{subtitle}</p></header>"
        f"<main>{body}</main>{REFRESH_SCRIPT % (context.refresh_seconds * 1000)}</body></html>"
    )


def _table(headers: Sequence[str], rows: Iterable[str], empty: str) -> str:
    body = "".join(rows)
    if not body:
        return f'<p class="empty">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


EDGE_HEADERS = ("source", "destination", "protocol", "rate", "success", "p50", "p99", "mTLS",
                "TCP sent/s", "TCP received/s", "denied")  # fmt: skip


def _workload_link(name: str) -> str:
    return f'<a href="{esc(workload_href(name))}">{esc(name)}</a>'


def edge_row(edge: Edge) -> str:
    http = edge.http
    cells = [
        _workload_link(edge.source),
        _workload_link(edge.destination),
        esc(edge.protocol),
        f"{number(edge.rate)} {edge.rate_unit}",
        percent(http.success_rate) if http else "-",
        millis(http.quantile(0.5)) if http else "-",
        millis(http.quantile(0.99)) if http else "-",
        esc(edge.mtls),
        f"{number(edge.tcp.sent_per_second)} B/s",
        f"{number(edge.tcp.received_per_second)} B/s",
        number(edge.denied),
    ]
    numeric = {3, 5, 6, 8, 9, 10}
    tds = "".join(
        f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
        for i, c in enumerate(cells)
    )
    cls = ' class="denied"' if edge.denied else ""
    return (
        f'<tr{cls} data-source="{esc(edge.source)}" '
        f'data-destination="{esc(edge.destination)}">{tds}</tr>'
    )


def edges_table(edges: Sequence[Edge]) -> str:
    return _table(EDGE_HEADERS, (edge_row(e) for e in edges), "none in the window")


def index_page(graph: Graph, context: Context) -> str:
    """The mesh at a glance: the service graph and its edges as a table."""
    drawing = graph_svg(
        graph, layout(graph.nodes, [(e.source, e.destination) for e in graph.edges]), workload_href
    )
    legend = (
        '<p class="note">Edges: requests/s on HTTP, connections opened/s on TCP; success rate '
        "and p99 when requests were seen; a padlock when every connection used mTLS; red when "
        "a policy denied traffic. Click a workload for its page.</p>"
    )
    body = (
        f'<h2>Service graph</h2><div class="graph-box">{drawing}</div>{legend}'
        f"<h2>Edges</h2>{edges_table(graph.edges)}"
    )
    return page("nodemesh dashboard", "nodemesh: service graph", context, body)


def _spec(spec: Any) -> str:
    return f"<pre>{esc(json.dumps(spec, indent=1, sort_keys=True))}</pre>"


def _policy_row(policy: Mapping[str, Any]) -> str:
    spec = policy.get("spec") or {}
    action = spec.get("action", "ALLOW") if policy.get("kind") == "AuthorizationPolicy" else "-"
    cells = [
        esc(policy.get("kind", "")),
        esc(f"{policy.get('namespace', '')}/{policy.get('name', '')}"),
        esc(action),
        "yes" if policy.get("dry_run") else "no",
        _spec(spec),
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


SERIAL_CHARS = 16


def _serial(serial: str) -> str:
    """A serial's first hex digits (enough to tell two apart), the whole one on hover."""
    if len(serial) <= SERIAL_CHARS:
        return esc(serial)
    return f'<span title="{esc(serial)}">{esc(serial[:SERIAL_CHARS])}…</span>'


def _cert_row(agent: str, entry: Mapping[str, Any]) -> str:
    cert = entry.get("certificate") or {}
    cells = [
        esc(agent),
        esc(entry.get("identity", "")),
        esc(entry.get("state", "")),
        _serial(str(cert.get("serial", "-"))),
        esc(cert.get("not_before", "-")),
        esc(cert.get("not_after", "-")),
        esc(cert.get("issuer", "-")),
        esc(entry.get("last_error") or ""),
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


CERT_HEADERS = ("agent", "identity", "state", "serial", "not before", "not after", "issuer",
                "last error")  # fmt: skip


def _pod_row(pod: Mapping[str, Any]) -> str:
    cells = [
        esc(pod.get("name", "")),
        esc(pod.get("node", "")),
        esc(", ".join(str(ip) for ip in pod.get("ips") or ())),
        esc(pod.get("identity", "")),
        "yes" if pod.get("meshed") else "no",
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def workload_page(
    name: str, graph: Graph, charts: Sequence[Chart], info: WorkloadInfo, context: Context
) -> str:
    """One workload: golden metrics over time, its edges, pods, policies and certificates."""
    errors = "".join(f'<p class="error">admin API not read: {esc(e)}</p>' for e in info.errors)
    body = (
        f'<p><a href="/">&larr; service graph</a></p>'
        f'<h2>Golden metrics</h2><div class="charts">{"".join(chart_svg(c) for c in charts)}'
        "</div>"
        f"<h2>Inbound edges</h2>{edges_table(graph.inbound(name))}"
        f"<h2>Outbound edges</h2>{edges_table(graph.outbound(name))}"
        f"<h2>Pods</h2>{errors}"
        + _table(
            ("pod", "node", "IPs", "identity", "meshed"),
            map(_pod_row, info.pods),
            "no pod of this workload in the agents' state",
        )
        + "<h2>Policies</h2>"
        + _table(
            ("kind", "name", "action", "dry run", "spec"),
            map(_policy_row, info.policies),
            "no AuthorizationPolicy or PeerAuthentication selects its pods",
        )
        + "<h2>Certificates</h2>"
        + _table(
            CERT_HEADERS,
            (_cert_row(a, c) for a, c in info.certificates),
            "no agent holds a certificate for its identities",
        )
    )
    return page(f"{name} · nodemesh", f"workload {esc(name)}", context, body)


def error_page(message: str, context: Context) -> str:
    body = f'<p class="error">{esc(message)}</p><p><a href="/">&larr; service graph</a></p>'
    return page("nodemesh dashboard: error", "nodemesh: the view cannot be shown", context, body)
