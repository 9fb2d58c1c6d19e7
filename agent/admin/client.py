"""Reading an agent's admin API from the CLI, with errors that say what to do.

The admin API listens on loopback in the agent's network namespace, so the usual mistake is
asking from the wrong place: the error names the address, the cause, and the ways to get there
(run it on the node, ``nodemesh lab exec NODE -- ...`` in the lab, ``kubectl exec`` or
port-forward in a cluster).

An answer is bounded as the view's are (``agent.view.sources``): ``timeout`` bounds each socket
operation, ``ANSWER_DEADLINE`` the whole answer (an agent that trickled it held the CLI, and
``nodemesh proxy-status``'s thread for that agent, for ever), and ``MAX_ANSWER_BYTES`` what is
read (an address that answered without end grew the CLI's memory without bound). Both are
generous: ``/connections`` of an agent with 100,000 live connections is about 100 MiB of JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
from typing import Any

from agent.base.constants import ADMIN_PORT
from agent.base.deadline import AnswerDeadline

DEFAULT_ADMIN = f"127.0.0.1:{ADMIN_PORT}"
ANSWER_DEADLINE = 60.0  # seconds for a whole answer, from the connect to its last byte
MAX_ANSWER_BYTES = 512 << 20


class AdminError(RuntimeError):
    """The agent's admin API could not be read; the message says why and what to try."""


def _not_an_address(address: str) -> str:
    return f"{address!r}: expected HOST:PORT, e.g. {DEFAULT_ADMIN}"


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AdminError(f"--admin {_not_an_address(address)}")
    return host.strip("[]"), int(port)


def admin_address(text: str) -> str:
    """``--admin``'s argparse type: a malformed address is a usage error (exit 2) before any
    agent is asked, not an agent that could not be read (``proxy-status`` made it a row of
    its table, UNREACHABLE, beside the agents it did read)."""
    try:
        split_address(text)
    except AdminError:
        raise argparse.ArgumentTypeError(_not_an_address(text)) from None
    return text


def request(
    address: str,
    path: str,
    *,
    method: str = "GET",
    timeout: float = 5.0,
    deadline: float = ANSWER_DEADLINE,
    limit: int = MAX_ANSWER_BYTES,
) -> Any:
    """The JSON answer of ``method path`` on the agent at ``address``: each socket operation
    within ``timeout`` seconds, the whole answer within ``deadline``, at most ``limit`` bytes."""
    host, port = split_address(address)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    watch = AnswerDeadline(deadline)
    try:
        conn.connect()
        assert conn.sock is not None
        watch.watch(conn.sock)
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read(limit + 1)
    except ConnectionRefusedError as e:
        raise AdminError(
            f"no nodemesh agent answers on {address} (connection refused). The admin API "
            "listens on 127.0.0.1 inside the agent's network namespace: run this on the node "
            "(lab: nodemesh lab exec node1 -- nodemesh ...; Kubernetes: kubectl exec into the "
            "agent pod, or kubectl port-forward it), or pass --admin HOST:PORT"
        ) from e
    except (OSError, http.client.HTTPException) as e:
        if watch.finish():
            raise _past_deadline(address, path, deadline, timeout) from e
        if isinstance(e, TimeoutError):
            raise AdminError(f"the agent at {address} did not answer within {timeout:.0f}s") from e
        raise AdminError(f"cannot read {path} from the agent at {address}: {e}") from e
    finally:
        conn.close()
        passed = watch.finish()
    if passed:  # shut down after the last byte came: what was read may be short
        raise _past_deadline(address, path, deadline, timeout)
    if len(body) > limit:
        raise AdminError(
            f"{address}{path}: the answer is larger than {limit >> 20} MiB; is {address} a "
            "nodemesh agent's admin API?"
        )
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


def _past_deadline(address: str, path: str, deadline: float, timeout: float) -> AdminError:
    return AdminError(
        f"{address}{path}: no whole answer within {deadline:g} s (each read came within "
        f"{timeout:g} s, but the answer kept trickling); is the agent overloaded, or is "
        f"{address} a nodemesh agent's admin API?"
    )
