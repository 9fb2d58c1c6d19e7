"""``nodemesh dashboard`` on a real lab, looked at in headless Chromium.

One lab (default topology). The client makes TCP connections to Service ``server``
(10.96.0.10:80 → 8080) and HTTP/1.1 requests to Service ``web`` (10.96.0.11:80 → 9080, declared
HTTP) with curl; then a DENY policy refuses neighbor's connections to the server pods and the
test makes denied attempts. The dashboard runs as a user runs it, from the host namespace
(``nodemesh dashboard --lab NAME``, on 127.0.0.1), and Chromium loads its pages; the checks read
the DOM after rendering: the lab's workloads as nodes, the edges with non-zero rates, the
denied edge marked, the workload page's charts, policy and certificate.

Screenshots of both pages are kept in ``test-artifacts/`` at the repository's root (ignored by
git; ``NODEMESH_TEST_ARTIFACTS`` moves it), and their paths are printed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from urllib.request import urlopen

import pytest

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from tests.labtools import counting_server, mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

TCP_PORT = 8080
TCP_SERVICE = "10.96.0.10"
WEB_PORT = 9080
WEB_SERVICE = "10.96.0.11"
CONNECTIONS = 5
REQUESTS = 20
WEB_SERVER = f"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers, body: two writes; no delayed-ACK stall
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")  # so curl's output is only the status codes
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", {WEB_PORT}), Handler).serve_forever()
"""
DENY_NEIGHBOR = {
    "apiVersion": "nodemesh.io/v1alpha1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "server-deny-neighbor", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"app": "server"}},
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/neighbor"]}}]}],
    },
}
ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = Path(os.environ.get("NODEMESH_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def connect_once(lab: Lab, pod: str) -> bool:
    """One connection from ``pod`` to Service server: True if answered, False if refused. A
    refusal is a reset, which may reach the client at any step, even before its ``connect``
    returned (as ``test_central_view_lab.connect_once`` knows)."""

    def run() -> bool:
        try:
            with socket.create_connection((TCP_SERVICE, 80), timeout=10) as sock:
                sock.sendall(b"x" * 100)
                sock.shutdown(socket.SHUT_WR)
                return sock.recv(64) != b""
        except (ConnectionResetError, BrokenPipeError):
            return False

    return call_in(lab.netns(pod), run)


def http_requests(lab: Lab) -> None:
    """``REQUESTS`` GETs to Service web from client, on one keep-alive connection (curl)."""
    urls = [f"http://{WEB_SERVICE}/item/{i}" for i in range(REQUESTS)]
    out = lab.exec(
        "client", "curl", "-sS", "--max-time", "20",
        "-w", "%{http_code}\\n", *urls, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["200"] * REQUESTS, out.stdout


def denied_attempts(lab: Lab) -> None:
    """Applies ``DENY_NEIGHBOR``, then connects from neighbor until 3 in a row are refused."""
    lab.apply(DENY_NEIGHBOR)
    made = in_a_row = 0
    while in_a_row < 3:
        assert made < 90, "the DENY policy never took effect"
        made += 1
        in_a_row = 0 if connect_once(lab, "neighbor") else in_a_row + 1


@contextmanager
def dashboard(lab: Lab) -> Iterator[str]:
    """``nodemesh dashboard --lab NAME`` on a free loopback port; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "dashboard", "--lab", lab.name,
         "--listen", "127.0.0.1:0", "--window", "2m", "--range", "5m", "--refresh", "60"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", first)
        assert match, f"nodemesh dashboard printed {first!r}, exit {proc.poll()}"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def get(url: str) -> str:
    with urlopen(url, timeout=30) as answer:
        body: bytes = answer.read()
        return body.decode()


def converged(url: str) -> str:
    """The graph page once Prometheus has scraped the test's traffic, denials included."""
    page = get(url)
    assert 'class="edge denied" data-source="default/neighbor"' in page, page[-3000:]
    assert 'data-source="default/client" data-destination="default/server"' in page
    assert 'data-protocol="http"' in page
    return page


VOID = frozenset({"meta", "link", "br", "img", "input", "hr"})  # no end tag


class Dom(HTMLParser):
    """What Chromium rendered: elements' attributes by class, and the text inside them."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.texts: dict[str, list[str]] = {}
        self._open: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        self.elements.append((tag, found))
        if tag not in VOID:
            self._open.append(found.get("class", ""))

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open and data.strip():
            self.texts.setdefault(self._open[-1], []).append(data.strip())

    def having(self, cls: str) -> list[dict[str, str]]:
        return [a for _, a in self.elements if cls in a.get("class", "").split()]


def chromium(url: str, screenshot: Path, profile: Path, height: int) -> Dom:
    """Chromium's DOM of ``url`` after rendering; a screenshot of it to ``screenshot``."""
    binary = shutil.which("chromium")
    assert binary, "chromium is missing: run scripts/setup.sh (Debian package chromium)"
    common = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={profile}", f"--window-size=1280,{height}"]  # fmt: skip
    shot = subprocess.run(
        [*common, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120
    )
    assert shot.returncode == 0 and screenshot.stat().st_size > 0, shot.stderr[-2000:]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return Dom(dom.stdout)


def rate_of(label: str) -> float:
    """The leading figure of an edge label (``12 req/s · ...``), k and M expanded."""
    figure = label.split()[0]
    scale = {"k": 1e3, "M": 1e6}.get(figure[-1], 1.0)
    return float(figure.rstrip("kM")) * scale


def test_the_dashboard_shows_the_mesh_in_a_browser(tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with (
        mesh_lab("db") as lab,
        pod_servers(lab, ("server-0", "server-1"), counting_server(TCP_PORT), TCP_PORT),
        pod_servers(lab, ("server-0", "server-1"), WEB_SERVER, WEB_PORT),
    ):
        assert lab.status()["prometheus"]["state"] == "running"
        assert all(connect_once(lab, "client") for _ in range(CONNECTIONS))
        http_requests(lab)
        denied_attempts(lab)
        with dashboard(lab) as url:
            retry(lambda: converged(url), timeout=60)

            graph_png = ARTIFACTS / f"dashboard-graph-{lab.name}.png"
            dom = chromium(url, graph_png, tmp_path / "profile", 900)
            print(f"\ndashboard screenshot (graph): {graph_png}")
            nodes = {a["data-workload"] for a in dom.having("node")}
            assert {"default/client", "default/neighbor", "default/server"} <= nodes
            assert {"client", "neighbor", "server"} <= set(dom.texts["node-name"])
            edges = {(e["data-source"], e["data-destination"]): e for e in dom.having("edge")}
            http = edges[("default/client", "default/server")]
            assert http["data-protocol"] == "http" and float(http["data-rate"]) > 0
            assert http["data-mtls"] == "yes" and "denied" not in http["class"]
            denied = edges[("default/neighbor", "default/server")]
            assert denied["class"].split() == ["edge", "denied"]
            assert int(denied["data-denied"]) >= 3
            labels = dom.texts["edge-label"]
            assert any("req/s" in t and "ok" in t and "p99" in t for t in labels), labels
            assert all(rate_of(t) > 0 for t in labels), labels
            assert any("denied" in t for t in labels), labels
            assert dom.having("mtls-lock")

            page = f"{url}workload?name=default/server"
            workload_png = ARTIFACTS / f"dashboard-workload-{lab.name}.png"
            dom = chromium(page, workload_png, tmp_path / "profile", 1900)
            print(f"dashboard screenshot (workload default/server): {workload_png}")
            charts = [a["data-chart"] for a in dom.having("chart")]
            assert charts == [
                "Requests", "Success rate", "Latency", "TCP connections opened", "TCP bytes",
            ]  # fmt: skip
            drawn = {a["data-line"] for _, a in dom.elements if a.get("class") == "series"}
            assert {"inbound", "inbound p99", "inbound received"} <= drawn, drawn
            tables = " ".join(t for texts in dom.texts.values() for t in texts)
            assert "default/server-deny-neighbor" in tables
            assert "spiffe://cluster.local/ns/default/sa/server" in tables
            assert "server-0" in tables and "server-1" in tables
