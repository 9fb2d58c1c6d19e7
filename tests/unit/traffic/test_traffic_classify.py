"""How the proxy classifies a failed open for retries and outlier detection."""

from __future__ import annotations

import pytest

from agent.policy.traffic.attempts import CONNECT_FAILURE, REFUSED
from agent.proxy.balanced import classify
from agent.proxy.tunnel import TunnelError


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (ConnectionRefusedError(111, "refused"), REFUSED),
        (TunnelError("peer answered 503", 503), REFUSED),  # far node could not reach the pod
        (TimeoutError(), CONNECT_FAILURE),
        (OSError(113, "no route to host"), CONNECT_FAILURE),
        (TunnelError("HBONE connection lost: closed by peer"), CONNECT_FAILURE),
        (TunnelError("peer answered 401", 401), None),  # policy denial: final, not the endpoint's
        (TunnelError("peer answered 400", 400), None),
        (ValueError("not a network error"), None),
    ],
)
def test_classify(error: BaseException, cause: str | None) -> None:
    assert classify(error) == cause
