"""``nodemesh status|workloads|connections|certs|policies`` against a served admin API."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from agent.admin.cli import (
    PodNotFound,
    format_certs,
    format_policies,
    format_policy_rules,
    format_status,
    policies_for_pod,
)
from agent.base.http import HttpServer
from agent.cli import main
from agent.telemetry.accesslog import connection_entry
from agent.telemetry.labels import endpoint_services, tcp_labels
from tests.unit.admin.admin_helpers import admin_with_certificate
from tests.unit.telemetry.telemetry_helpers import make_store, outbound

COMMANDS = ["status", "workloads", "connections", "certs", "policies"]


def live_connection() -> dict[str, object]:
    snap = make_store().snapshot()
    record = outbound()
    record.bytes_sent, record.bytes_received = 3 * 1024 * 1024, 512
    return connection_entry(record, tcp_labels(record, snap, endpoint_services(snap)), time.time())


@pytest.fixture(scope="module")
def admin() -> Iterator[str]:
    """An admin API served from a loop in a thread (the CLI is synchronous)."""
    loop = asyncio.new_event_loop()
    started: dict[str, int] = {}
    server: list[HttpServer] = []

    async def start() -> None:
        api, _cert, _drain = await admin_with_certificate()
        api.s.connections = lambda: [live_connection()]
        server.append(HttpServer(api.handle))
        started["port"] = await server[0].start("127.0.0.1", 0)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"127.0.0.1:{started['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(server[0].stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", COMMANDS)
def test_tables_fit_100_columns(
    command: str, admin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, command, "--admin", admin)
    assert (code, err) == (0, "")
    assert out.strip() and max(len(line) for line in out.splitlines()) <= 100


def test_status_shows_the_warnings_the_state_source_holds(
    admin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run(capsys, "status", "--admin", admin, "-o", "json")
    status = json.loads(out)
    assert "warning:" not in format_status(status)
    message = "annotation nodemesh.io/http-port: unknown nodemesh annotation"
    warning = {"object": "Pod default/web", "reason": "UnknownAnnotation", "message": message}
    status["state"]["warnings"] = [warning]
    assert format_status(status).splitlines()[-2:] == [
        "",
        "warning: Pod default/web: annotation nodemesh.io/http-port: unknown nodemesh annotation",
    ]


def test_table_contents(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, status, _ = run(capsys, "status", "--admin", admin)
    assert "ready:        yes" in status and "1 of 1 available" in status
    assert "degraded:     no" in status
    _, workloads, _ = run(capsys, "workloads", "--admin", admin, "--local")
    assert workloads.splitlines()[1].split()[:5] == [
        "default", "client", "node1", "10.244.1.2", "yes"
    ]  # fmt: skip
    _, connections, _ = run(capsys, "connections", "--admin", admin)
    row = connections.splitlines()[1].split()
    assert row[:6] == ["out", "default/client", "default/server", "mTLS", "3.0MiB", "512B"]
    assert row[-1] == "10.244.2.2:8080"  # the replica and port it went to
    _, certs, _ = run(capsys, "certs", "--admin", admin)
    assert certs.splitlines()[1].split()[:2] == ["default/client", "Available"]
    _, policies, _ = run(capsys, "policies", "--admin", admin)
    assert "AuthorizationPolicy  default    deny-outsider  all pods    DENY, 1 rule(s)" in policies


def test_policies_say_what_each_applies_to() -> None:
    """As Istio reads them: a selector's pods, all pods of the namespace without one, of every
    namespace in the root namespace; a Service for targetRef kinds (not a field in SUMMARY)."""

    def policy(kind: str, namespace: str, spec: dict[str, object]) -> dict[str, object]:
        return {"kind": kind, "namespace": namespace, "name": "p", "spec": spec}

    selector = {"matchLabels": {"version": "v1", "app": "server"}}
    table = format_policies(
        {
            "policies": [
                policy("AuthorizationPolicy", "default", {"selector": selector, "action": "DENY"}),
                policy("PeerAuthentication", "default", {"mtls": {"mode": "STRICT"}}),
                policy("AuthorizationPolicy", "nodemesh-system", {"action": "ALLOW"}),
                policy("PeerAuthentication", "nodemesh-system", {"selector": selector}),
                policy("TrafficPolicy", "default", {"targetRef": {"kind": "Service", "name": "web"},
                                                    "retries": {"attempts": 2}}),
                policy("HTTPFault", "default", {"abort": {"httpStatus": 503}}),
            ]
        }
    )  # fmt: skip
    header, *lines = table.splitlines()
    at, summary = header.index("APPLIES TO"), header.index("SUMMARY")
    assert [(line[at:summary].rstrip(), line[summary:]) for line in lines] == [
        ("pods app=server,version=v1", "DENY, 0 rule(s)"),
        ("all pods", "mTLS STRICT"),
        ("all pods (mesh-wide)", "ALLOW, 0 rule(s)"),
        ("pods app=server,version=v1 (mesh-wide)", "mTLS UNSET"),
        ("Service web", "retries"),
        ("route rules naming it", "abort"),
    ]


@pytest.mark.parametrize(
    ("command", "key"),
    [
        ("status", "counts"),
        ("workloads", "workloads"),
        ("connections", "connections"),
        ("certs", "certificates"),
        ("policies", "policies"),
    ],
)
def test_json_output_is_the_endpoint(
    command: str, key: str, admin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, command, "--admin", admin, "-o", "json")
    assert code == 0 and key in json.loads(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", COMMANDS)
def test_unreachable_agent_is_a_helpful_error(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, command, "--admin", f"127.0.0.1:{_free_port()}")
    assert code == 1 and out == ""
    assert "connection refused" in err and "nodemesh lab exec" in err and "--admin" in err


@pytest.mark.parametrize("command", [*COMMANDS, "requests", "proxy-status"])
def test_bad_address_is_a_usage_error(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused while parsing, before any agent is asked: proxy-status made it an UNREACHABLE
    row of its table, requests named it twice ("localhost: --admin 'localhost': ...")."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--admin", "localhost"])
    out = capsys.readouterr()
    assert exit_.value.code == 2 and out.out == ""
    assert out.err.splitlines()[-1] == (
        f"nodemesh {command}: error: argument --admin: 'localhost': expected HOST:PORT, "
        "e.g. 127.0.0.1:15000"
    )


def test_policies_warn_of_values_that_never_match() -> None:
    spec = {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["post"]}}]}]}
    table = format_policies(
        {"policies": [{"kind": "AuthorizationPolicy", "namespace": "default", "name": "p",
                       "spec": spec}]}
    )  # fmt: skip
    assert table.splitlines()[-2:] == [
        "",
        "warning: AuthorizationPolicy default/p: spec.rules[0].to[0].operation.methods[0]: 'post'"
        " never matches: methods compare exactly; requests send 'POST'",
    ]


def test_policies_warn_of_principals_of_another_trust_domain_than_the_agents() -> None:
    spec = {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"]}}]}]}
    policies = [{"kind": "AuthorizationPolicy", "namespace": "default", "name": "p", "spec": spec}]
    table = format_policies({"policies": policies, "trust_domain": "example.org"})
    assert table.splitlines()[-1].startswith(
        "warning: AuthorizationPolicy default/p: spec.rules[0].from[0].source.principals[0]: "
        "'cluster.local/ns/a/sa/b' is of trust domain cluster.local, but this mesh's is "
        "example.org"
    )
    assert "warning" not in format_policies({"policies": policies, "trust_domain": "cluster.local"})


def test_policies_for_a_pod_are_those_that_select_it_or_target_its_services() -> None:
    """``istioctl x describe pod``'s question: the selectors (its namespace, or the root one),
    and a targetRef naming a Service in its namespace whose selector matches the pod."""
    pod = {"namespace": "shop", "name": "web-0", "labels": {"app": "web", "version": "v1"}}
    other = {"namespace": "shop", "name": "db-0", "labels": {"app": "db"}}
    services = [
        {"namespace": "shop", "name": "web", "selector": {"app": "web"}},
        {"namespace": "shop", "name": "all", "selector": {}},  # selects nothing (no endpoints)
        {"namespace": "other", "name": "web", "selector": {"app": "web"}},
    ]

    def policy(kind: str, namespace: str, name: str, **spec: object) -> dict[str, object]:
        return {"kind": kind, "namespace": namespace, "name": name, "spec": spec}

    web = {"kind": "Service", "name": "web"}
    policies = [
        policy("AuthorizationPolicy", "shop", "web-only", selector={"matchLabels": {"app": "web"}}),
        policy("AuthorizationPolicy", "shop", "db-only", selector={"matchLabels": {"app": "db"}}),
        policy("PeerAuthentication", "shop", "namespace-wide"),
        policy("PeerAuthentication", "nodemesh-system", "mesh-wide"),
        policy("PeerAuthentication", "other", "elsewhere"),
        policy("TrafficPolicy", "shop", "web", targetRef=web),
        policy("RateLimitPolicy", "other", "web", targetRef=web),
        policy("TrafficPolicy", "shop", "all", targetRef={"kind": "Service", "name": "all"}),
        policy("HTTPFault", "shop", "abort"),
    ]
    got = policies_for_pod(policies, [other, pod], services, "shop/web-0")
    assert [(p["kind"], p["name"]) for p in got] == [
        ("AuthorizationPolicy", "web-only"),
        ("PeerAuthentication", "namespace-wide"),
        ("PeerAuthentication", "mesh-wide"),
        ("TrafficPolicy", "web"),
    ]
    with pytest.raises(PodNotFound, match=r"^no pod default/web-0; known: shop/db-0, shop/web-0$"):
        policies_for_pod(policies, [other, pod], services, "web-0")


def test_policies_of_one_pod_from_the_agent(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "policies", "--admin", admin, "--pod", "default/client")
    assert (code, err) == (0, "") and "deny-outsider" in out
    code, out, err = run(capsys, "policies", "--admin", admin, "--pod", "ghost", "-o", "json")
    assert (code, out) == (1, "")
    assert err.startswith("nodemesh policies: no pod default/ghost; known: default/client, ")


def test_one_policy_in_detail_shows_each_rule_on_a_line() -> None:
    policy = {
        "kind": "AuthorizationPolicy", "namespace": "shop", "name": "no-admin", "generation": 3,
        "dry_run": True,
        "spec": {
            "action": "DENY",
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [
                {
                    "from": [
                        {"source": {"principals": ["cluster.local/ns/a/sa/x", "*/sa/y"]}},
                        {"source": {"namespaces": ["dev"], "ipBlocks": ["10.0.0.0/8"]}},
                    ],
                    "to": [{"operation": {"ports": ["8080"], "methods": ["POST"],
                                          "paths": ["/admin*"], "hosts": ["web"]}}],
                    "when": [{"key": "request.headers[x-user]", "values": ["bob"],
                              "notValues": ["alice"]}],
                },
                {},
            ],
        },
    }  # fmt: skip
    text = format_policy_rules({"policies": [policy]})
    assert text.splitlines() == [
        "AuthorizationPolicy shop/no-admin (generation 3)",
        "  applies to: pods app=web",
        "  action:     DENY",
        "  dry-run:    yes (logged, not enforced)",
        "  rules:      2 (a request that any one matches)",
        "    [0] from: (principals=cluster.local/ns/a/sa/x,*/sa/y) or "
        "(namespaces=dev ipBlocks=10.0.0.0/8); to: ports=8080 methods=POST paths=/admin* "
        "hosts=web; when: request.headers[x-user] in [bob] and request.headers[x-user] "
        "not in [alice]",
        "    [1] every request",
    ]
    allow_nothing = {**policy, "dry_run": False, "spec": {}}
    assert (
        "rules:      none: it matches no request (ALLOW: the pods it applies to admit nothing)"
        in (format_policy_rules({"policies": [allow_nothing]}))
    )


def test_policies_name_from_the_agent(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "policies", "--admin", admin, "deny-outsider")
    assert (code, err) == (0, "")
    assert "  action:     DENY\n  dry-run:    no\n" in out
    assert "    [0] from: ipBlocks=1.2.3.4" in out
    code, rules, _ = run(capsys, "policies", "--admin", admin, "--rules")
    assert "    [0] from: ipBlocks=1.2.3.4" in rules
    code, out, err = run(capsys, "policies", "--admin", admin, "default/ghost")
    assert (code, out) == (1, "")
    assert err.startswith(
        "nodemesh policies: no policy default/ghost; known: default/deny-outsider"
    )


def test_a_policy_without_rules_shows_its_spec_fields() -> None:
    policy = {
        "kind": "PeerAuthentication", "namespace": "shop", "name": "strict", "generation": 1,
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}},
    }  # fmt: skip
    assert format_policy_rules({"policies": [policy]}).splitlines() == [
        "PeerAuthentication shop/strict (generation 1)",
        "  applies to: pods app=web",
        "  dry-run:    no",
        '  mtls:       {"mode": "STRICT"}',
    ]


def test_a_long_spec_field_keeps_a_space_before_its_value() -> None:
    # A RateLimitPolicy's requestsPerSecond and perIdentity are longer than the label column:
    # they read "requestsPerSecond:20" unless a space always separates name and value.
    policy = {
        "kind": "RateLimitPolicy", "namespace": "default", "name": "web-limit", "generation": 2,
        "spec": {"targetRef": {"kind": "Service", "name": "web"}, "requestsPerSecond": 20,
                 "burst": 20, "perIdentity": False},
    }  # fmt: skip
    assert format_policy_rules({"policies": [policy]}).splitlines()[3:] == [
        "  requestsPerSecond: 20",
        "  burst:      20",
        "  perIdentity: false",
    ]


def test_a_rate_limit_summary_says_its_rate() -> None:
    # Not the spec's field names ("burst, perIdentity, requestsPerSecond", cut to fit): the
    # numbers, and "per identity" only when it is on (the agent fills in perIdentity: false).
    def limit(per_identity: bool) -> dict[str, object]:
        spec = {"targetRef": {"kind": "Service", "name": "web"}, "requestsPerSecond": 20,
                "burst": 40, "perIdentity": per_identity}  # fmt: skip
        return {"kind": "RateLimitPolicy", "namespace": "default", "name": "l", "spec": spec}

    rows = format_policies({"policies": [limit(False)]}).splitlines()
    assert rows[1].split("Service web")[1].strip() == "20 rps, burst 40"
    rows = format_policies({"policies": [limit(True)]}).splitlines()
    assert rows[1].split("Service web")[1].strip() == "20 rps, burst 40, per identity"


def test_certs_show_how_many_roots_each_identity_trusts() -> None:
    # A root rotation waits until every agent trusts the new root (README, "The mesh CA"):
    # the table says it, where -o json needed reading certificate.roots.
    def entry(roots: list[str]) -> dict[str, object]:
        cert = {"serial": "ab12", "not_after": "2026-12-09T00:00:00+00:00", "roots": roots}
        return {"identity": "spiffe://cluster.local/ns/default/sa/web", "state": "Available",
                "certificate": cert, "last_error": None}  # fmt: skip

    table = format_certs({"certificates": [entry(["1a"]), entry(["1a", "2b"])]}).splitlines()
    assert table[0].split()[6] == "ROOTS"
    assert [row.split()[4] for row in table[1:]] == ["1", "2"]
