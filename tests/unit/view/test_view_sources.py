"""The view's sources without sockets: the runner hook stands in for the HTTP GET."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import urllib.parse
from collections.abc import Callable

import pytest

from agent.view import cli
from agent.view.aggregate import OPENED, TCP_FAMILIES, increase
from agent.view.screen import Screen
from agent.view.series import ViewError
from agent.view.sources import Agent, AgentSource, PrometheusSource, http_get, read_bounded
from tests.trickle import Trickler


def test_prometheus_source_asks_each_family_at_one_instant() -> None:
    def runner(func: Callable[[], bytes]) -> bytes:
        del func  # no HTTP: the answer below stands in for Prometheus
        return json.dumps(
            {
                "status": "success",
                "data": {
                    "resultType": "matrix",
                    "result": [{"metric": {"reporter": "destination"}, "values": [[990, "4"]]}],
                },
            }
        ).encode()

    source = PrometheusSource("http://prom:9090", runner, clock=lambda: 1000.0)
    window = source.window(60)
    assert (window.start, window.end) == (940.0, 1000.0)
    assert set(window.families) == set(TCP_FAMILIES)
    assert window.series(OPENED)[0].samples == ((990.0, 4.0),)


def test_prometheus_query_url_carries_the_selector_and_time() -> None:
    urls: list[str] = []

    def fake_get(url: str, runner: object) -> bytes:
        urls.append(url)
        return b'{"status": "success", "data": {"resultType": "matrix", "result": []}}'

    source = PrometheusSource("http://prom:9090/", clock=lambda: 1000.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("agent.view.sources.http_get", fake_get)
        source.window(30)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(urls[0]).query)
    assert urls[0].startswith("http://prom:9090/api/v1/query?")
    assert query["query"] == [f"{TCP_FAMILIES[0]}[330000ms]"]
    assert query["time"] == ["1000.000"]


def test_agent_source_waits_the_window_once_then_measures_from_the_last_scrape() -> None:
    now = [100.0]
    counts = iter([2, 5, 9])
    slept: list[float] = []

    def runner(func: Callable[[], bytes]) -> bytes:
        del func
        return f'{OPENED}{{reporter="source"}} {next(counts)}\n'.encode()

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    source = AgentSource(
        [Agent("http://n1:15020/metrics", runner)], clock=lambda: now[0], sleep=sleep
    )
    first = source.window(10)
    assert slept == [10]
    assert (first.start, first.end) == (100.0, 110.0)
    now[0] = 113.0
    second = source.window(10)
    assert slept == [10]  # no second wait: the previous scrape is the baseline
    assert (second.start, second.end) == (110.0, 113.0)
    assert increase(first.series(OPENED)[0], first.start, first.end) == 3
    assert increase(second.series(OPENED)[0], second.start, second.end) == 4


def test_explicit_sources_win_over_the_lab() -> None:
    parser = cli.argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["stat", "--prometheus", "http://p:9090", "--window", "2m"])
    assert args.window == 120.0
    assert isinstance(cli.source_of(args), PrometheusSource)
    args = parser.parse_args(["edges", "--agent", "http://a:15020/metrics", "--agent", "http://b"])
    source = cli.source_of(args)
    assert isinstance(source, AgentSource)
    assert [a.url for a in source.agents] == ["http://a:15020/metrics", "http://b"]


def test_top_prints_plain_frames_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Screen(out) as screen:
        screen.show(["one", "two"])
        screen.show(["three"])
    assert out.getvalue() == "---\none\ntwo\n---\nthree\n"


def test_an_answer_past_the_bound_fails_the_view_and_is_not_read_further() -> None:
    """An endpoint that answers without end was read whole; now at most the bound (+1)."""

    class Endless(io.RawIOBase):
        handed = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            n = len(buffer)
            buffer[:n] = b"x" * n
            self.handed += n
            return n

    endless = Endless()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("agent.view.sources.MAX_ANSWER_BYTES", 1 << 20)
        mp.setattr(
            "agent.view.sources._open",
            lambda url, watch: contextlib.nullcontext(io.BufferedReader(endless)),
        )
        with pytest.raises(ViewError, match="larger than 1 MiB"):
            http_get("http://agent:15020/metrics")
    assert endless.handed <= (1 << 20) + 64 * 1024
    body = read_bounded("http://agent:15020/metrics", io.BytesIO(b"m 1\n"), limit=1 << 20)
    assert body == b"m 1\n"


@pytest.mark.parametrize("where", ["head", "body"])
def test_an_answer_that_trickles_past_the_deadline_fails_the_view_naming_the_url(
    where: str,
) -> None:
    """Each byte comes well within the per-read ``TIMEOUT``, so only the deadline on the whole
    answer stops it: before it, the view read every byte however long they took (here the
    server stops after a few hundred, so the test ends either way)."""
    body = b"m 1\n" * 100
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    if where == "head":
        head = head.replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"p" * 300 + b"\r\n\r\n")
    server = Trickler(head, body, pause=0.02)
    try:
        with pytest.raises(ViewError) as caught:
            http_get(server.url, deadline=0.3)
        message = str(caught.value)
        assert server.url in message
        assert "no whole answer within 0.3 s" in message
        # The view let go of the connection: the server saw it leave before sending all.
        assert server.client_left.wait(30)
        assert server.sent < len(server.data)
        if where == "head":
            assert server.sent < len(head)
    finally:
        server.close()


def test_an_answer_within_the_deadline_is_read_whole_and_an_error_names_its_status() -> None:
    body = b"m 1\n" * 10
    server = Trickler(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), body, 0)
    try:
        assert http_get(server.url, deadline=30) == body
    finally:
        server.close()
    server = Trickler(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\n", b"gone", 0)
    try:
        with pytest.raises(ViewError, match="HTTP 404: gone"):
            http_get(server.url, deadline=30)
    finally:
        server.close()


def test_an_address_where_nothing_listens_is_named_plainly() -> None:
    """ "connection refused", as the admin CLI says it, not "<urlopen error [Errno 111] ...>"."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}/metrics"
    with pytest.raises(ViewError) as caught:
        http_get(url)
    assert str(caught.value) == f"GET {url} failed: connection refused"


@pytest.mark.parametrize(
    "argv", [["stat", "--window", "0s"], ["edges", "--window", "0m"], ["top", "--interval", "0s"]]
)
def test_a_window_or_interval_of_no_time_is_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed "(no traffic in the window)"; `top --interval 0s` asked without pause."""
    parser = cli.argparse.ArgumentParser(prog="nodemesh")
    cli.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.endswith(f": {argv[-1]!r}: expected a duration above 0, e.g. 30s or 1m")
