"""Reading an agent's admin API from the CLI, with errors that say what to do.

The admin API listens on loopback in the agent's network namespace, so the usual mistake is
asking from the wrong place: the error names the address, the cause, and the ways to get there
(run it on the node, ``nodemesh lab exec NODE -- ...`` in the lab, ``kubectl exec`` or
port-forward in a cluster).
"""

from __future__ import annotations

import http.client
import json
from typing import Any

from agent.base.constants import ADMIN_PORT

DEFAULT_ADMIN = f"127.0.0.1:{ADMIN_PORT}"


class AdminError(RuntimeError):
    """The agent's admin API could not be read; the message says why and what to try."""


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AdminError(f"--admin {address!r}: expected HOST:PORT, e.g. {DEFAULT_ADMIN}")
    return host.strip("[]"), int(port)


def request(address: str, path: str, *, method: str = "GET", timeout: float = 5.0) -> Any:
    """The JSON answer of ``method path`` on the agent at ``address``."""
    host, port = split_address(address)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
    except ConnectionRefusedError as e:
        raise AdminError(
            f"no nodemesh agent answers on {address} (connection refused). The admin API "
            "listens on 127.0.0.1 inside the agent's network namespace: run this on the node "
            "(lab: nodemesh lab exec node1 -- nodemesh ...; Kubernetes: kubectl exec into the "
            "agent pod, or kubectl port-forward it), or pass --admin HOST:PORT"
        ) from e
    except TimeoutError as e:
        raise AdminError(f"the agent at {address} did not answer within {timeout:.0f}s") from e
    except (OSError, http.client.HTTPException) as e:
        raise AdminError(f"cannot read {path} from the agent at {address}: {e}") from e
    finally:
        conn.close()
    try:
        value = json.loads(body)
    except ValueError as e:
        raise AdminError(
            f"{address}{path} did not answer JSON (HTTP {response.status}): is {address} a "
            "nodemesh agent's admin API?"
        ) from e
    if response.status != 200:
        raise AdminError(f"{address}{path}: HTTP {response.status}: {value.get('error', value)}")
    return value
