"""The dashboard's page in headless Chromium without a lab: it refreshes itself, and a hostile
workload name stays text. The server runs on loopback with a stand-in for Prometheus."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.view.dashboard import Dashboard, server
from tests.integration.telemetry.test_dashboard_lab import Dom
from tests.unit.view.test_view_dashboard import EVIL, FakeSource, evil_graph_window, mesh

BROWSER = shutil.which("chromium")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="chromium (scripts/setup.sh) is missing")


@contextmanager
def serving(board: Dashboard) -> Iterator[str]:
    httpd = server(board, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def rendered(url: str, profile: Path, *, seconds: float) -> str:
    """Chromium's DOM of ``url`` after ``seconds`` of virtual time (timers run, network waits)."""
    assert BROWSER is not None
    out = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         f"--virtual-time-budget={int(seconds * 1000)}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_page_fetches_itself_again_and_swaps_its_content(tmp_path: Path) -> None:
    source = FakeSource(mesh())
    with serving(Dashboard(source, [], refresh_seconds=1)) as url:
        dom = rendered(url, tmp_path, seconds=3.5)
    assert len(source.asked) >= 3  # the first load, then one fetch per second
    assert dom.count("<main>") == 1  # swapped, not nested
    page = Dom(dom)
    assert {e["data-source"] for e in page.having("edge")} == {
        "default/client",
        "default/neighbor",
    }


def test_a_hostile_workload_name_is_shown_as_text(tmp_path: Path) -> None:
    with serving(Dashboard(FakeSource(evil_graph_window()), [], refresh_seconds=60)) as url:
        page = Dom(rendered(url, tmp_path, seconds=0.5))
    assert [tag for tag, _ in page.elements].count("script") == 1  # the page's own
    names = page.texts["node-name"]
    assert EVIL[:10] in " ".join(names), names
    (edge,) = page.having("edge")
    assert edge["data-destination"].endswith(EVIL)
