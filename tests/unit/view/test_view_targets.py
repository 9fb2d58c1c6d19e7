"""``nodemesh stat NAME``: a name that names nothing is refused, an idle one is not; ``-o json``;
the ``unknown`` Service row explained. The agent's admin API and the metrics are stand-ins."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from agent.view import cli, render
from agent.view.aggregate import Figures
from agent.view.series import ViewError, Window
from agent.view.sources import Runner
from agent.view.targets import missing

WORKLOADS = [
    {"namespace": "default", "name": "server-0", "labels": {"app": "server"}},
    {"namespace": "default", "name": "server-1", "labels": {"app": "server"}},
    {"namespace": "shop", "name": "client", "labels": {}},
]
SERVICES = [
    {"namespace": "default", "name": "web", "hostname": "web.default.svc.cluster.local"},
]


@pytest.mark.parametrize(
    ("resource", "name", "namespace"),
    [
        ("workload", "server", None),
        ("workload", "default/server", None),
        ("workload", "shop/client", None),
        ("workload", "client", "shop"),
        ("service", "web", None),
        ("service", "web.default.svc.cluster.local", None),
        ("service", "web", "default"),
    ],
)
def test_a_known_name_is_not_missing(resource: str, name: str, namespace: str | None) -> None:
    assert missing(resource, name, namespace, WORKLOADS, SERVICES) is None


def test_a_missing_workload_is_named_with_the_known_ones() -> None:
    assert missing("workload", "nosuch", None, WORKLOADS, SERVICES) == (
        "workload nosuch not found; workloads: default/server, shop/client"
    )
    assert missing("workload", "shop/server", None, WORKLOADS, SERVICES) is not None
    assert missing("workload", "server", "shop", WORKLOADS, SERVICES) is not None


def test_a_pod_name_points_to_its_workload() -> None:
    problem = missing("workload", "server-1", None, WORKLOADS, SERVICES)
    assert problem is not None
    assert "(pod server-1 is in workload default/server: the metrics name the workload)" in problem


def test_a_missing_service_is_named_with_the_known_ones() -> None:
    assert missing("service", "nosuch", None, WORKLOADS, SERVICES) == (
        "service nosuch not found; Services: default/web"
    )
    assert missing("service", "web", "shop", WORKLOADS, SERVICES) is not None


class _Idle:
    """Metrics without a sample: every target is idle."""

    def window(self, seconds: float, families: Sequence[str] = ()) -> Window:
        return Window(1000.0 - seconds, 1000.0, {})

    def describe(self) -> str:
        return "no Prometheus"


def _run(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    admin: dict[str, Any] | None = None,
) -> tuple[int, str, str]:
    """``nodemesh stat ARGV`` against idle metrics and an agent whose state is ``admin`` (None:
    the agent cannot be read)."""

    def get(url: str, runner: Runner | None = None) -> bytes:
        del runner
        if admin is None:
            raise ViewError(f"GET {url} failed: connection refused")
        return json.dumps(admin[url.rsplit("/", 1)[1]]).encode()

    monkeypatch.setattr(cli, "source_of", lambda _args: _Idle())
    monkeypatch.setattr(cli, "http_get", get)
    parser = cli.argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["stat", *argv, "--prometheus", "http://p", "--admin", "127.0.0.1:1"])
    status = args.func(args)
    out, err = capsys.readouterr()
    return status, out, err


STATE = {"workloads": {"workloads": WORKLOADS}, "services": {"services": SERVICES}}


@pytest.mark.parametrize("argv", [["deploy/nosuch"], ["svc/nosuch"], ["workload", "server-0"]])
def test_stat_of_a_name_nothing_has_fails_on_stderr_with_the_known_names(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    status, out, err = _run(monkeypatch, capsys, argv, STATE)
    assert status == 1
    assert "(no traffic in the window)" not in out
    assert err.startswith("nodemesh stat: error: ")
    assert "not found" in err
    assert ("Services: default/web" if "svc" in argv[0] else "workloads: default/server") in err


@pytest.mark.parametrize(
    "argv", [["deploy/server"], ["svc/web"], ["service", "web", "-n", "default"]]
)
def test_stat_of_a_known_idle_name_prints_the_empty_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    status, out, err = _run(monkeypatch, capsys, argv, STATE)
    assert (status, err) == (0, "")
    assert out.splitlines()[-1] == "(no traffic in the window)"


def test_stat_without_an_agent_to_ask_keeps_the_empty_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(monkeypatch, capsys, ["deploy/nosuch"], None)
    assert status == 0
    assert out.splitlines()[-1] == "(no traffic in the window)"


@pytest.mark.parametrize("flag", [["-o", "json"], ["--output", "json"], ["--json"]])
def test_stat_prints_json_with_o_json_as_the_other_commands_and_with_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flag: list[str]
) -> None:
    status, out, _ = _run(monkeypatch, capsys, ["svc/web", *flag], STATE)
    assert status == 0
    assert json.loads(out) == []


def test_the_unknown_service_row_says_what_it_is() -> None:
    """Istio's ``destination_service="unknown"`` (no Service holds the address) stays the
    metrics' label and the JSON key; the table words it and explains it under the rows."""
    f = Figures(opened=2, seconds=60)
    lines = render.stat_lines("service", {("unknown",): f, ("web.default.svc.cluster.local",): f})
    assert [line.split("  ")[0] for line in lines[1:3]] == [
        "unknown (no Service)",
        "web.default.svc.cluster.local",
    ]
    assert lines[3] == render.NO_SERVICE_NOTE
    assert "a pod that backs no Service" in lines[3] and 'destination_service="unknown"' in lines[3]
    assert render.NO_SERVICE_NOTE not in render.stat_lines("service", {("web",): f})
    assert render.stat_lines("workload", {("default/web",): f})[-1].startswith("default/web ")


def test_tops_busiest_paths_word_the_unknown_service_as_stat_does() -> None:
    f = Figures(opened=2, seconds=60)
    lines = render.path_lines(
        [(("default/a", "default/b", "unknown"), f), (("default/a", "default/c", "c.svc"), f)]
    )
    assert "default/a -> default/b  unknown (no Service) " in lines[1]
    assert "default/a -> default/c  c.svc " in lines[2]
    assert lines[3] == render.NO_SERVICE_NOTE
    known = render.path_lines([(("default/a", "default/c", "c.svc"), f)])
    assert render.NO_SERVICE_NOTE not in known
