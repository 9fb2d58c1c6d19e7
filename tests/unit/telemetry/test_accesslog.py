"""The access log's request line (``agent.telemetry.accesslog.request_line``): written directly
for speed, it must be exactly what ``json.dumps`` makes of ``request_entry``, the documented
fields the tap and ``nodemesh requests`` show, for any values the records can hold."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from agent.telemetry.accesslog import request_entry, request_line
from agent.telemetry.http import REQUEST_LABEL_NAMES
from agent.telemetry.records import ConnectionRecord, RequestRecord

TEXT = st.text(max_size=40)  # any code point: quotes, backslashes, controls, non-ASCII
COUNT = st.integers(min_value=0, max_value=2**63)
MILLIS = st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False)


@given(
    st.builds(
        ConnectionRecord,
        direction=st.sampled_from(["inbound", "outbound"]),
        source=TEXT,
        destination=TEXT,
        id=COUNT,
        upstream=TEXT,
    ),
    st.builds(
        RequestRecord,
        method=TEXT,
        path=TEXT,
        authority=TEXT,
        status=st.integers(min_value=0, max_value=999),
        duration_ms=MILLIS,
        request_bytes=COUNT,
        response_bytes=COUNT,
        response_flags=TEXT,
        request_id=TEXT,
        grpc_status=TEXT,
        upstream=TEXT,
    ),
    st.lists(TEXT, min_size=len(REQUEST_LABEL_NAMES), max_size=len(REQUEST_LABEL_NAMES)),
    st.floats(min_value=0.0, max_value=4e9, allow_nan=False),
)
def test_the_request_line_is_json_dumps_of_the_request_entry(
    connection: ConnectionRecord, request: RequestRecord, values: list[str], ended: float
) -> None:
    labels = dict(zip(REQUEST_LABEL_NAMES, values, strict=True))
    entry = request_entry(connection, request, labels, ended)
    assert request_line(connection, request, labels, ended) == json.dumps(
        entry, separators=(",", ":")
    )
