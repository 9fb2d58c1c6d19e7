"""CPU of ``Authorizer.evaluate`` against the cluster's number of AuthorizationPolicies.

Run: ``.venv/bin/python -m tests.bench.policy.bench_authz_select [--rounds 7]`` from a tree
(run it from a detached tree of main too, alternately, for the A/B): one JSON line.

Policies are spread two per namespace (``ns0`` ...), each selecting its own ``app``; the
workloads measured are one in a namespace without policies (``quiet``: the usual pod) and one
selected by a single ALLOW that matches (``shop``). Per evaluate: in-process CPU
(``time.process_time``), min of ``--rounds`` rounds of ``--number`` calls, same workload and
request each time (as a connection's requests are). ``build``: ``Authorizer(...)`` from the
compiled policies (what the index adds per state version; ``compile``: the whole
``Authorizer.compile``, for scale); ``first``: the selection through the index, what a
workload's first request of a state version adds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from agent.policy.authz import Authorizer, Request, compile_policy
from agent.state.model import PolicyObject, Workload

ROOT = "nodemesh-system"
REQUEST = Request("10.244.2.2", "10.244.1.3", 8080, "spiffe://cluster.local/ns/front/sa/web")
QUIET = Workload("u1", "q", "quiet", "sa", "node1", ("10.244.1.3",), {"app": "q", "v": "1"})
SHOP = Workload("u2", "s", "shop", "sa", "node1", ("10.244.1.3",), {"app": "web", "v": "1"})


def policies(count: int) -> list[PolicyObject]:
    """``count`` policies: one ALLOW selecting ``SHOP``, the rest two per namespace."""
    rule = {"from": [{"source": {"namespaces": ["front"]}}]}
    out = [
        PolicyObject(
            "AuthorizationPolicy",
            "shop",
            "web",
            {"action": "ALLOW", "selector": {"matchLabels": {"app": "web"}}, "rules": [rule]},
        )
    ]
    for i in range(count - 1):
        spec = {"action": "ALLOW", "selector": {"matchLabels": {"app": f"a{i}"}}, "rules": [rule]}
        out.append(PolicyObject("AuthorizationPolicy", f"ns{i // 2}", f"p{i}", spec))
    return out


def per_call(fn: Callable[[], object], number: int, rounds: int) -> float:
    """µs per call: min over rounds of in-process CPU."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(number):
            fn()
        best = min(best, time.process_time() - start)
    return best / number * 1e6


def measure(count: int, rounds: int) -> dict[str, float]:
    """The numbers of one policy count (see the module docstring)."""
    objs = policies(count)
    compiled = sorted((compile_policy(p) for p in objs), key=lambda c: c.ref)
    authz = Authorizer(compiled, root_namespace=ROOT)
    assert authz.evaluate(REQUEST, SHOP).policy == "shop/web"
    assert authz.evaluate(REQUEST, QUIET).policy is None
    number = max(200, 200_000 // count) if count > 100 else 50_000
    builds = max(20, 20_000 // count)
    out = {
        "quiet_us": per_call(lambda: authz.evaluate(REQUEST, QUIET), number, rounds),
        "one_allow_us": per_call(lambda: authz.evaluate(REQUEST, SHOP), number, rounds),
        "build_us": per_call(lambda: Authorizer(compiled, root_namespace=ROOT), builds, rounds),
        "compile_us": per_call(lambda: Authorizer.compile(objs, root_namespace=ROOT), 3, rounds),
    }
    select = getattr(authz, "_select", None)  # the index's miss: a workload's first request
    if select is not None:
        out["first_us"] = per_call(lambda: select(SHOP), number, rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--counts", default="10,100,1000,5000")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print(json.dumps({str(count): measure(count, args.rounds) for count in counts}))


if __name__ == "__main__":
    main()
