"""Python calls and CPU per ``Authorizer.evaluate`` where N AuthorizationPolicies select the pod.

Run: ``.venv/bin/python tests/bench/policy/bench_authz_match.py [--rounds 7]`` from a tree (run
this file with a detached tree of main's interpreter too, alternately, for the A/B: it imports
only ``agent``). One JSON line per N (1, 10, 100).

The pod (``shop/web``) is selected by N ALLOW policies, policy i with one rule of the usual
production shape: ``from`` one principal (``.../sa/c{i}``), ``to`` methods GET and POST on
paths ``/api/v{i}/*`` and ``/health``. Two HTTP GETs over mTLS: ``last`` from ``c{N-1}`` to
``/api/v{N-1}/items`` matches only the last policy (every policy's rule is asked: the cost
grows with N), ``first`` from ``c0`` to ``/health`` the first (one policy's match); ``mixed``
is ``last`` with a DENY, an AUDIT and a dry-run DENY of ``/admin*`` selecting the pod too (each
asked in full: the request meets none of them). The N=1 row
with ``last`` is the bench's ``--policed`` case (one ALLOW with a path rule). ``calls``:
the calls of one evaluate, ``[Python functions, built-ins]`` (``sys.setprofile``; cProfile's
totals left some of the walk's out); ``us``: in-process CPU
(``time.process_time``), min of ``--rounds`` rounds of ``--number`` evaluates of the same
request (as a connection's requests are).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from types import FrameType
from typing import Any

from agent.policy.authz import Authorizer, HttpAttributes, Request
from agent.state.model import PolicyObject, Workload

POD = Workload("u2", "web", "shop", "sa", "node1", ("10.244.1.3",), {"app": "web", "v": "1"})
HEADERS = ((b"host", b"web"), (b"user-agent", b"h2load"), (b"accept", b"*/*"))


def policies(count: int) -> list[PolicyObject]:
    out = []
    for i in range(count):
        rule = {
            "from": [{"source": {"principals": [f"cluster.local/ns/front/sa/c{i}"]}}],
            "to": [
                {"operation": {"methods": ["GET", "POST"], "paths": [f"/api/v{i}/*", "/health"]}}
            ],
        }
        spec = {"action": "ALLOW", "selector": {"matchLabels": {"app": "web"}}, "rules": [rule]}
        out.append(PolicyObject("AuthorizationPolicy", "shop", f"p{i:03d}", spec))
    return out


def mixed(count: int) -> list[PolicyObject]:
    """``policies(count)`` and a DENY, an AUDIT and a dry-run DENY of ``/admin*``."""
    no_admin = {"rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}
    return [
        *policies(count),
        PolicyObject("AuthorizationPolicy", "shop", "deny", {"action": "DENY", **no_admin}),
        PolicyObject("AuthorizationPolicy", "shop", "audit", {"action": "AUDIT", **no_admin}),
        PolicyObject(
            "AuthorizationPolicy", "shop", "trial", {"action": "DENY", **no_admin}, dry_run=True
        ),
    ]


def request(caller: int, path: str) -> Request:
    principal = f"spiffe://cluster.local/ns/front/sa/c{caller}"
    http = HttpAttributes("GET", path, "web", HEADERS)
    return Request("10.244.2.2", "10.244.1.3", 8080, principal, http)


def measure(authz: Authorizer, req: Request, rounds: int, number: int) -> tuple[list[int], float]:
    assert authz.evaluate(req, POD).allowed
    counted = [0, 0]

    def count(_frame: FrameType, event: str, _arg: Any) -> None:
        if event in ("call", "c_call"):
            counted[event == "c_call"] += 1

    sys.setprofile(count)
    authz.evaluate(req, POD)
    sys.setprofile(None)
    calls = [counted[0], counted[1] - 1]  # not ``sys.setprofile(None)`` itself
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(number):
            authz.evaluate(req, POD)
        best = min(best, time.process_time() - start)
    return calls, best / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    for count in (1, 10, 100):
        authz = Authorizer.compile(policies(count))
        row: dict[str, object] = {"policies": count}
        last = request(count - 1, f"/api/v{count - 1}/items")
        cases = [
            ("last", authz, last),
            ("first", authz, request(0, "/health")),
            ("mixed", Authorizer.compile(mixed(count)), last),
        ]
        for name, which, req in cases:
            number = args.number if name == "first" else max(args.number // count, 200)
            calls, us = measure(which, req, args.rounds, number)
            row[name] = {"calls": calls, "us": round(us, 3)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
