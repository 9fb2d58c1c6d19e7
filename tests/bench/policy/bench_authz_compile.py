"""CPU of a state version in which N AuthorizationPolicies changed: ``Authorizer.compile``.

Run: ``.venv/bin/python -m tests.bench.policy.bench_authz_compile [--rounds 7]`` from a tree
(and from a detached tree of main, alternately, for the A/B: it imports only ``agent`` and the
match bench's policies). One JSON line per N (100, 1,000).

The policies are ``bench_authz_match.mixed(N)``'s (N ALLOWs of one shape, a DENY, an AUDIT and
a dry-run DENY); each round compiles a version in which every one of them changed (a path of
each is new, so none is equal to the last version's: each is compiled again, as after a
rollout that edits them all) with the last version as ``previous``, as ``Core.policies`` does.
The generated code is cached by its text, which same-shaped policies share, so this is what a
changed policy costs when its shape is known (the usual edit). ``ms``: in-process CPU
(``time.process_time``), min of ``--rounds`` rounds. With ``--callgrind`` (run under
``valgrind --tool=callgrind --instr-atstart=no``) instrumentation is on only while the last
round compiles, so the instructions callgrind counts are that one compile's:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/c.cg \\
        .venv/bin/python -m tests.bench.policy.bench_authz_compile --callgrind --only 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from agent.policy.authz import Authorizer
from agent.state.model import PolicyObject
from tests.bench.policy.bench_authz_match import mixed


def edited(policies: list[PolicyObject], version: int) -> list[PolicyObject]:
    """``policies`` each changed (one more path, new per ``version``), its shape kept."""
    out = []
    for p in policies:
        rules = [dict(r) for r in p.spec["rules"]]
        to = rules[0]["to"][0]["operation"]
        rules[0]["to"] = [{"operation": {**to, "paths": [*to["paths"][:-1], f"/v{version}"]}}]
        out.append(PolicyObject(p.kind, p.namespace, p.name, {**p.spec, "rules": rules}, p.dry_run))
    return out


def _callgrind(on: bool) -> None:
    command = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
    subprocess.run(command, check=True, capture_output=True)


def measure(count: int, rounds: int, callgrind: bool) -> float:
    base = mixed(count)
    previous = Authorizer.compile(edited(base, 0))
    best = float("inf")
    for version in range(1, rounds + 1):
        policies = edited(base, version)
        if callgrind and version == rounds:
            _callgrind(True)
        start = time.process_time()
        authz = Authorizer.compile(policies, previous=previous)
        best = min(best, time.process_time() - start)
        if callgrind and version == rounds:
            _callgrind(False)
        previous = authz
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", type=int, help="one N instead of 100 and 1,000")
    parser.add_argument("--callgrind", action="store_true")
    args = parser.parse_args()
    for count in [args.only] if args.only else [100, 1000]:
        ms = measure(count, args.rounds, args.callgrind)
        print(json.dumps({"changed": count + 3, "ms": round(ms, 3)}), flush=True)


if __name__ == "__main__":
    main()
