"""Checks smoke.sh runs inside an agent's container, through the nodemesh CLI and so through that
agent's admin API (127.0.0.1:15000 in the node's network namespace).

    python3 - cert IDENTITY        the agent holds a valid certificate for IDENTITY
    python3 - mtls SOURCE DEST     a live connection from SOURCE to DEST is mutual TLS

Identities are SPIFFE IDs. Exit status 0 when the check holds; otherwise 1 and the reason, with
what the agent reported, on stderr. (Fed on standard input, so nothing is copied into the pod.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def cli(command: str) -> Any:
    out = subprocess.run(
        ["nodemesh", command, "-o", "json"], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def cert_problem(data: Any, identity: str) -> str | None:
    for entry in data.get("certificates", []):
        if entry.get("identity") == identity:
            if entry.get("state") == "Available":
                return None
            return f"{identity} is {entry.get('state')}: {entry.get('last_error')}"
    return f"no certificate entry for {identity}"


def mtls_problem(data: Any, source: str, destination: str) -> str | None:
    matching = [
        c
        for c in data.get("connections", [])
        if c.get("source_identity") == source and c.get("destination_identity") == destination
    ]
    if not matching:
        return f"no live connection {source} -> {destination}"
    if all(c.get("security") == "mutual_tls" for c in matching):
        return None
    return f"connection {source} -> {destination} is not mutual TLS"


def main(argv: list[str]) -> int:
    if argv[:1] == ["cert"] and len(argv) == 2:
        data = cli("certs")
        problem = cert_problem(data, argv[1])
    elif argv[:1] == ["mtls"] and len(argv) == 3:
        data = cli("connections")
        problem = mtls_problem(data, argv[1], argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if problem is None:
        return 0
    print(f"admin_check: {problem}\n{json.dumps(data, indent=2)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
