"""Reading h2load 1.52's output (text captured from a real run)."""

from __future__ import annotations

import pytest

from bench import h2load

OUTPUT = """\
starting benchmark...
Application protocol: http/1.1
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 500.56ms, 37792.00 req/s, 2.38MB/s
requests: 18896 total, 18898 started, 18896 done, 18890 succeeded, 6 failed, 0 errored, 0 timeout
status codes: 18890 2xx, 0 3xx, 6 4xx, 0 5xx
traffic: 1.19MB (1247136) total, 682.77KB (699152) headers (space savings 0.00%), 36.91KB data
                     min         max         mean         sd        +/- sd
time for request:       22us      2.98ms        51us        72us    97.55%
"""


def test_summary_reads_rate_counts_and_status_classes() -> None:
    got = h2load.summary(OUTPUT)
    assert got == {
        "rps": 37792.0,
        "requests": 18896,
        "started": 18898,
        "succeeded": 18890,
        "failed": 6,
        "errored": 0,
        "timeout": 0,
        "status": {"2xx": 18890, "3xx": 0, "4xx": 6, "5xx": 0},
    }


def test_seconds_in_the_finished_line_are_read_too() -> None:
    assert h2load.summary(OUTPUT.replace("500.56ms", "1.30s"))["rps"] == 37792.0


def test_output_without_a_summary_is_an_error_naming_its_last_lines() -> None:
    with pytest.raises(h2load.H2loadOutputError, match="connect error"):
        h2load.summary("starting benchmark...\nclient could not connect: connect error\n")


def test_log_lines_give_each_request_time() -> None:
    log = "1796518126810787\t200\t104\n1796518126810789\t403\t2144\n"
    assert h2load.latencies_us(log) == [104.0, 2144.0]


def test_a_malformed_log_line_is_named() -> None:
    with pytest.raises(h2load.H2loadOutputError, match="line 2"):
        h2load.latencies_us("1\t200\t5\n1\t200\n")
