"""``/routes`` and ``nodemesh routes``: each route's conditions per parent, its rules' backends
with weights and the requests this node sent to each; a refused route says why."""

from __future__ import annotations

from agent.admin.cli import format_routes
from agent.admin.views import routes_view
from tests.unit.policy.routes_fixtures import NS, backend, mesh_services, route, snapshot

SPLIT = route(
    "split", [{"backendRefs": [backend("echo-v1", weight=90), backend("echo-v2", weight=10)]}]
)
BAD = route("bad", [{"filters": [{"type": "CORS"}], "backendRefs": [backend("echo-v1")]}])


def test_rules_show_weights_and_the_requests_each_backend_got() -> None:
    key = ("HTTPRoute", NS, "split")
    routed = {(key, 0, f"{NS}/echo-v1"): 27, (key, 0, f"{NS}/echo-v2"): 3}
    views = routes_view(snapshot(mesh_services(), [SPLIT, BAD]), routed)
    by_name = {v["name"]: v for v in views}
    split = by_name["split"]
    (parent,) = split["parents"]  # type: ignore[misc]
    assert parent["service"] == f"{NS}/echo" and parent["ports"] == [80]
    assert parent["accepted"]["status"] and parent["resolved_refs"]["status"]
    (rule,) = split["rules"]  # type: ignore[misc]
    assert [(b["service"], b["weight"], b["requests"]) for b in rule["backends"]] == [
        (f"{NS}/echo-v1", 90, 27),
        (f"{NS}/echo-v2", 10, 3),
    ]
    assert "CORS" in str(by_name["bad"]["error"]) and "rules" not in by_name["bad"]
    text = format_routes({"routes": views})
    lines = [line.split() for line in text.splitlines() if line.strip()]
    # (the 100-column table shortens the long conformance namespace; the figures stay whole)
    assert ["90", "(90%)", "27", "(90%)", "-"] in [line[-5:] for line in lines]
    assert ["10", "(10%)", "3", "(10%)", "-"] in [line[-5:] for line in lines]
    assert any(line[0] == "HTTPRoute" and "refused" in line for line in lines)


def test_each_rule_says_what_it_matches() -> None:
    """A rule is known by what it matches (as the YAML says it), not by its index alone."""
    matched = route(
        "matched",
        [
            {
                "matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
                "backendRefs": [backend("echo-v2")],
            },
            {
                "matches": [
                    {"path": {"type": "PathPrefix", "value": "/api/"}, "method": "POST"},
                    {"path": {"type": "Exact", "value": "/login"}, "queryParams": [
                        {"name": "v", "value": "2"}
                    ]},
                ],
                "backendRefs": [backend("echo-v1")],
            },
            {"backendRefs": [backend("echo-v1")]},
        ],
    )  # fmt: skip
    (view,) = routes_view(snapshot(mesh_services(), [matched]), {})
    rules = view["rules"]
    assert isinstance(rules, list)
    assert [r["match"] for r in rules] == [
        "x-canary=true",
        "POST /api* | =/login ?v=2",
        "*",
    ]
    header, *rows = format_routes({"routes": [view]}).split("\n\n")[1].splitlines()
    assert header.split()[1:3] == ["RULE", "MATCH"]
    # (the 100-column table may shorten the cell; it keeps its start)
    assert [row.split()[2:4] for row in rows] == [
        ["0", "x-canary=true"], ["1", "POST"], ["2", "*"]
    ]  # fmt: skip


def test_no_routes_says_so() -> None:
    assert format_routes({"routes": routes_view(snapshot(mesh_services(), []), {})}).startswith(
        "no routes"
    )
