"""The admin API's documented shapes, its errors, and that no private key ever appears."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from agent.admin.api import ENDPOINTS
from agent.base.http import Request
from tests.unit.admin.admin_helpers import admin_with_certificate, private_key_texts
from tests.unit.telemetry.telemetry_helpers import CLIENT_ID

Answers = dict[str, tuple[int, Any]]


def call(method: str, path: str, **query: str) -> tuple[Answers, int]:
    """Every GET endpoint's answer, then ``method path`` as "call"; and the drain calls."""

    async def scenario() -> tuple[dict[str, tuple[int, str]], int]:
        api, _cert, drain = await admin_with_certificate()
        out = {}
        for p in [*ENDPOINTS, "/workloads?local=1"]:
            path_only, _, q = p.partition("?")
            args = dict([q.split("=")]) if q else {}
            response = await api.handle(Request("GET", path_only, args))
            out[p] = (response.status, response.body.decode())
        response = await api.handle(Request(method, path, query))
        out["call"] = (response.status, response.body.decode())
        return out, drain.calls

    raw, drains = asyncio.run(scenario())
    return {k: (status, json.loads(body)) for k, (status, body) in raw.items()}, drains


def test_every_endpoint_answers_its_documented_shape() -> None:
    answers, _ = call("GET", "/")
    assert answers["/"][1]["endpoints"] == ENDPOINTS
    status = answers["/status"][1]
    assert set(status) == {
        "node", "version", "ready", "not_ready", "degraded", "uptime_seconds", "state", "counts",
        "datapath", "certificates",
    }  # fmt: skip
    assert status["certificates"]["identities"] == 1
    assert status["certificates"]["soonest_expiry"] is not None
    assert status["state"]["applied_at"] is None  # committed before the API subscribed
    assert status["counts"]["workloads"] == 3 and status["counts"]["certificates_available"] == 1
    assert status["ready"] is True and status["datapath"]["failure_mode"] == "fail-closed"
    workloads = answers["/workloads"][1]["workloads"]
    assert [w["name"] for w in workloads] == ["client", "server-0", "server-1"]
    assert set(workloads[0]) >= {"uid", "namespace", "node", "local", "ips", "identity", "meshed"}
    assert [w["name"] for w in answers["/workloads?local=1"][1]["workloads"]] == ["client"]
    service = answers["/services"][1]["services"][0]
    assert service["hostname"] == "server.default.svc.cluster.local"
    assert service["ports"] == [
        {
            "name": "",
            "port": 80,
            "target_port": 8080,
            "protocol": "TCP",
            "app_protocol": "",
            "declared": "tcp",
        }
    ]
    assert [e["ip"] for e in service["endpoints"]] == ["10.244.2.2", "10.244.2.3"]
    policy = answers["/policies"][1]["policies"][0]
    assert (policy["kind"], policy["name"], policy["spec"]["action"]) == (
        "AuthorizationPolicy", "deny-outsider", "DENY"
    )  # fmt: skip
    cert = answers["/certs"][1]["certificates"][0]
    assert (cert["identity"], cert["state"]) == (CLIENT_ID, "Available")
    assert set(cert["certificate"]) >= {"serial", "not_before", "not_after", "chain"}
    assert cert["certificate"]["chain"].startswith("-----BEGIN CERTIFICATE-----")
    assert answers["/connections"][1] == {"connections": []}
    assert answers["/datapath"][1]["datapath"]["attachments"] == {"pv0": "nm_pod_ingress"}
    dump = answers["/config_dump"][1]
    assert set(dump) == {
        "version", "node", "config", "state", "workloads", "services", "policies",
        "certificates", "datapath", "traffic",
    }  # fmt: skip
    assert dump["certificates"] == answers["/certs"][1]["certificates"]
    assert answers["/traffic"][1] == {"policies": {}, "effective": {}, "services": {}}
    assert dump["traffic"] == answers["/traffic"][1]
    assert set(answers["/logging"][1]["levels"]) >= {"root", "nodemesh.access", "agent.proxy"}


def test_no_private_key_in_any_response() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        api, cert, _ = await admin_with_certificate()
        bodies = []
        for path in ENDPOINTS:
            bodies.append((await api.handle(Request("GET", path))).body.decode())
        return bodies, private_key_texts(cert)

    bodies, keys = asyncio.run(scenario())
    assert any("BEGIN CERTIFICATE" in b for b in bodies)  # the chain is there...
    for body in bodies:
        for key in keys:
            assert key not in body  # ...the key is not


def test_errors_name_the_endpoints_and_methods() -> None:
    answers, _ = call("GET", "/nope")
    status, body = answers["call"]
    assert status == 404 and "/config_dump" in body["error"]
    answers, _ = call("POST", "/certs")
    assert answers["call"][0] == 405
    answers, drains = call("GET", "/quitquitquit")
    assert answers["call"][0] == 405 and drains == 0
    answers, _ = call("POST", "/logging")
    assert answers["call"][0] == 400 and "level=" in answers["call"][1]["error"]
    answers, _ = call("POST", "/logging", level="loud")
    assert answers["call"][0] == 400 and "use one of" in answers["call"][1]["error"]
    # A GET meant to change a level is refused with the POST to use, not answered 200 unchanged.
    answers, _ = call("GET", "/logging", level="debug", logger="agent.proxy")
    status, body = answers["call"]
    assert status == 405
    assert "POST /logging?level=debug&logger=agent.proxy" in body["error"]


def test_quitquitquit_drains_and_logging_changes_a_level() -> None:
    answers, drains = call("POST", "/quitquitquit")
    assert answers["call"] == (200, {"draining": True}) and drains == 1
    logger = logging.getLogger("agent.telemetry")
    old = logger.level
    try:
        answers, _ = call("POST", "/logging", level="error", logger="agent.telemetry")
        assert answers["call"][0] == 200
        assert answers["call"][1]["levels"]["agent.telemetry"] == "error"
    finally:
        logger.setLevel(old)
