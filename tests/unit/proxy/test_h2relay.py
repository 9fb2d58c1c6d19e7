"""The destination's frame relay (``agent.proxy.h2relay``): ``test_h2proxy.py``'s destination
tests run against it, then what only the relay has (HPACK state across the relay)."""

from __future__ import annotations

import pytest

import tests.unit.proxy.h2peers as h2peers
import tests.unit.proxy.test_h2proxy as full
from agent.proxy.h2relay import H2Relay

# The destination's behaviours, as ``test_h2proxy.py`` states them for ``H2Proxy``. Left out,
# as they are about ``H2Proxy``'s own re-encoding of what it forwards (the relay forwards blocks
# as they came): cookies joined, literals not Huffman-coded, no dynamic table on the proxy's
# legs, per-call values made never-indexed.
SHARED = [
    "test_a_request_reaches_the_pod_with_a_request_id_and_its_response_comes_back",
    "test_a_request_id_the_client_sent_is_kept",
    "test_a_denied_request_gets_403_and_the_connection_keeps_serving",
    "test_a_denied_grpc_call_is_a_trailers_only_permission_denied",
    "test_grpc_status_comes_from_trailers_and_from_trailers_only_responses",
    "test_a_pod_that_does_not_read_stops_the_client_within_the_windows",
    "test_a_client_that_does_not_read_stops_the_pod_within_the_windows",
    "test_an_upstream_that_dies_is_unavailable_for_grpc_and_502_for_http",
    "test_an_upstream_that_dies_mid_response_resets_the_stream",
    "test_a_stream_the_client_resets_is_cancelled_at_the_pod",
    "test_a_ping_flood_closes_the_connection",
    "test_pings_the_shell_keeps_taking_answers_for_are_fine",
    "test_rapid_reset_closes_the_connection",
    "test_a_malformed_request_block_closes_the_connection_as_a_protocol_error",
    "test_malformed_request_trailers_close_the_connection_as_a_protocol_error",
    "test_a_malformed_response_block_from_the_pod_is_unavailable_and_counted",
    "test_empty_request_trailers_are_forwarded",
    "test_relayed_data_skips_h2s_send_data",
    "test_a_continuation_flood_closes_the_connection",
    "test_a_header_block_over_the_limit_closes_the_connection",
    "test_more_streams_than_advertised_closes_the_connection",
    "test_a_run_of_empty_data_frames_closes_the_connection",
    "test_a_denied_head_is_authorized_with_method_path_and_authority",
    "test_response_bytes_not_yet_taken_are_not_counted_as_replies_to_the_client",
    "test_an_open_header_block_starts_the_header_clock_and_its_end_stops_it",
    "test_a_rate_limited_grpc_call_is_a_trailers_only_resource_exhausted",
]
for _name in SHARED:
    globals()[_name] = getattr(full, _name)


@pytest.fixture(autouse=True)
def _relay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``H2Proxy`` these tests make at the destination is an ``H2Relay``."""
    monkeypatch.setattr(h2peers, "H2Proxy", H2Relay)
    monkeypatch.setattr(full, "H2Proxy", H2Relay)
