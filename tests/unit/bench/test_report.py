"""Medians, ratios and the Markdown table from a hand-made results document."""

from pathlib import Path
from typing import Any

import pytest

from bench import report, summary


def path(key: str, title: str, *, ok: bool = True, proxies: int = 2) -> dict[str, Any]:
    checks = ["checked"] if ok else ["FAILED: plaintext marker seen"]
    return {
        "key": key,
        "title": title,
        "proxy_pids": list(range(proxies)),
        "verification": {"ok": ok, "checks": checks, "cipher": "", "speed_cipher": ""},
    }


def sample(rep: int, key: str, workload: str, **values: Any) -> dict[str, Any]:
    return {"rep": rep, "path": key, "workload": workload, **values}


def results() -> dict[str, Any]:
    samples = []
    for rep, (direct_gbps, mesh_gbps) in enumerate([(10.0, 2.0), (8.0, 1.0), (9.0, 3.0)]):
        samples += [
            sample(rep, "direct", "bulk_1", gbps=direct_gbps, bytes=10**9, proxy_cpu_s=0.0),
            sample(rep, "mesh_cross", "bulk_1", gbps=mesh_gbps, bytes=10**9, proxy_cpu_s=2.0),
            sample(rep, "stunnel", "bulk_1", gbps=4.0, bytes=2 * 10**9, proxy_cpu_s=1.0),
            sample(rep, "direct", "rr", p50_us=50.0, p99_us=100.0),
            sample(rep, "mesh_cross", "rr", p50_us=200.0, p99_us=1000.0),
            sample(rep, "stunnel", "rr", p50_us=100.0, p99_us=500.0),
        ]
    samples.append(sample(0, "mesh_cross", "conn", error="reset by peer"))
    for rep, (completed, cpu) in enumerate([(1000, 1.0), (3000, 2.0)]):
        samples.append(sample(rep, "stunnel", "conn", rate=500.0, completed=completed,
                              proxy_cpu_s=cpu))  # fmt: skip
        samples.append(sample(rep, "direct", "conn", rate=5000.0, completed=completed,
                              proxy_cpu_s=0.0, client_cpu_s=cpu / 2,
                              server_cpu_s=cpu / 4))  # fmt: skip
    for i, s in enumerate(samples):
        s["load1"] = float(i % 5)
    return {
        "started": "t0",
        "finished": "t1",
        "json_name": "results.json",
        "settings": {"streams": 4, "reps": 3, "quick": False},
        "machine": dict.fromkeys(
            [
                "cpu",
                "cores",
                "memory_gib",
                "os",
                "kernel",
                "python",
                "openssl",
                "iperf3",
                "stunnel",
            ],
            "x",
        ),
        "load": {"before": [1.0, 1.0, 1.0], "after": [2.0, 2.0, 2.0]},
        "code": {"commit": "abc1234", "dirty": ["agent/proxy/relay.py"]},
        "paths": [
            path("direct", "direct", proxies=0),
            path("mesh_cross", "mesh"),
            path("stunnel", "stunnel", ok=False),
        ],
        "samples": samples,
        "idle": {
            "mesh_cross": {
                "steps": [
                    {"open": 0, "rss_bytes": 10 * 2**20},
                    {"open": 100, "rss_bytes": 11 * 2**20},
                ],
                "bytes_per_connection": 2**20 / 100,
            }
        },
        "openssl_speed": [
            {"cipher": "aes-256-gcm", "negotiated_by": ["mesh: X"], "bytes_per_second": 1e9}
        ],
    }


def test_medians_across_repetitions_and_costs_only_for_paths_with_a_proxy() -> None:
    values = summary.path_values(results())
    assert values["direct"]["bulk_1"] == 9.0
    assert values["mesh_cross"]["bulk_1"] == 2.0
    assert values["mesh_cross"]["rr_p99"] == 1000.0
    assert values["mesh_cross"]["cpu_per_gb"] == pytest.approx(2.0)  # 6 CPU s over 3 GB
    assert values["stunnel"]["cpu_per_gb"] == pytest.approx(0.5)
    assert values["direct"]["cpu_per_gb"] is None  # no proxy, not "free"
    assert values["mesh_cross"]["conn_rate"] is None  # the only sample failed
    assert values["mesh_cross"]["conn_cpu"] is None
    assert values["stunnel"]["conn_cpu"] == pytest.approx(750.0)  # 3 CPU s over 4,000 conns
    assert values["direct"]["conn_cpu"] is None
    # client 1.5 s + echo server 0.75 s over 4,000 connections; stunnel's runs reported neither
    assert values["direct"]["conn_load_cpu"] == pytest.approx(562.5)
    assert values["stunnel"]["conn_load_cpu"] is None
    assert values["mesh_cross"]["mem_per_conn"] == pytest.approx(10.24)  # KiB
    assert values["stunnel"]["mem_per_conn"] is None


def test_ratios_against_direct_and_stunnel() -> None:
    ratios = summary.ratios(summary.path_values(results()))
    assert set(ratios) == {"nodemesh cross / direct", "nodemesh cross / stunnel4"}
    assert ratios["nodemesh cross / direct"]["bulk_1"] == pytest.approx(2.0 / 9.0)
    assert ratios["nodemesh cross / stunnel4"]["rr_p50"] == pytest.approx(2.0)
    assert ratios["nodemesh cross / direct"]["cpu_per_gb"] is None


def test_markdown_marks_untrusted_paths_and_lists_failures() -> None:
    text = report.markdown(results(), "chart.png")
    header = next(line for line in text.splitlines() if line.startswith("| metric"))
    assert "stunnel (untrusted)" in header
    assert "mesh (untrusted)" not in header
    assert "| throughput, 1 stream | Gbit/s | 9.00 | 2.00 | 4.00 | 0.22x | 0.50x |" in text
    assert "| proxy CPU per new connection | µs | — | — | 750 | — | — |" in text
    assert "**stunnel** (UNTRUSTED): FAILED: plaintext marker seen" in text
    assert "- mesh_cross conn rep 0: reset by peer" in text
    assert "aes-256-gcm (mesh: X): 8.00 Gbit/s" in text
    assert "![benchmark chart](chart.png)" in text
    assert "commit abc1234 plus uncommitted changes to agent/proxy/relay.py" in text
    assert "1-minute load after each sample: min 0.0, median 2.0, max 4.0" in text


def test_chart_is_a_png(tmp_path: Path) -> None:
    out = tmp_path / "chart.png"
    report.chart(results(), out)
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def _phase(upgrade: dict[str, Any] | None, resets: int) -> dict[str, Any]:
    return {
        "upgrade": upgrade,
        "long_lived": 100,
        "resets": resets,
        "new_ok": 150,
        "new_failed": 0,
        "escapes": 0,
        "probes": {"ok": {"readiness": 80}, "down": {"readiness": 2} if resets else {}},
        "longest_stall_ms": 46.5,
        "slowest_new_ms": 80.0,
    }


def test_upgrade_section_lists_each_phase_and_a_failed_section_is_a_failure() -> None:
    done = results() | {
        "upgrade": {
            "phases": {
                "baseline": _phase(None, 0),
                "node1": _phase({"takeover_seconds": 1.5}, 3),
            }
        }
    }
    text = report.markdown(done, None)
    assert "| baseline | — | 100 | 0 | 150 | 0 | 0 | 0 | 46.5 | 80.0 |" in text
    assert "| node1 | 1.50 | 100 | 3 | 150 | 0 | 0 | 2 | 46.5 | 80.0 |" in text
    failed = results() | {"upgrade": {"error": "lab upgrade timed out"}}
    assert "- upgrade: lab upgrade timed out" in report.markdown(failed, None)


def test_idle_agents_section_gives_each_agent_process_its_rss_and_how_it_got_its_programs() -> None:
    agents = [
        {"node": "node1", "moment": "lab up", "pid": 7, "programs": "compiled",
         "rss_bytes": 70 * 2**20},
        {"node": "node2", "moment": "lab up", "pid": 8, "programs": "adopted",
         "rss_bytes": 40 * 2**20, "processes": [
             {"pid": 8, "role": "main", "rss_bytes": 40 * 2**20, "pss_bytes": 30 * 2**20,
              "anon_bytes": 25 * 2**20},
             {"pid": 9, "role": "agent.datapath.netlinkd", "rss_bytes": 33 * 2**20,
              "pss_bytes": 23 * 2**20, "anon_bytes": 22.5 * 2**20},
         ]},
        {"node": "node1", "moment": "restarted", "error": "/datapath answered 503"},
    ]  # fmt: skip
    text = report.markdown(results() | {"agents": agents}, None)
    assert "- node1's agent (lab up): 70.0 MiB, programs compiled at start-up" in text
    assert "- node2's agent (lab up): 40.0 MiB, programs adopted at start-up" in text
    assert "  - main (pid 8): RSS 40.0 MiB, PSS 30.0 MiB, anonymous 25.0 MiB" in text
    assert (
        "  - agent.datapath.netlinkd (pid 9): RSS 33.0 MiB, PSS 23.0 MiB, anonymous 22.5 MiB"
        in text
    )
    assert "- node1's agent (restarted): ERROR /datapath answered 503" in text
    assert "Idle agents" not in report.markdown(results(), None)


def _http(rep: int, key: str, rps: float, p50: float, cpu: float, counted: int) -> dict[str, Any]:
    return sample(rep, key, "http", rps=rps, p50_us=p50, p90_us=p50 * 2, p99_us=p50 * 4,
                  requests=1000, proxy_cpu_s=cpu, destination_counted=counted,
                  single_p50_us=p50 / 10 + rep, single_p90_us=p50 / 5,
                  single_p99_us=p50 / 2)  # fmt: skip


def test_http_section_medians_cpu_per_request_and_what_node2_counted() -> None:
    http_paths = [
        {"key": "direct", "title": "direct", "proxy_pids": []},
        {"key": "mesh_l4", "title": "L4", "proxy_pids": [1, 2]},
        {"key": "mesh_http", "title": "HTTP", "proxy_pids": [1, 2]},
    ]
    samples = [
        *(_http(rep, "direct", rps, 50.0, 0.0, 0) for rep, rps in enumerate([9e3, 10e3, 11e3])),
        *(_http(rep, "mesh_l4", 4e3, 100.0, 0.1, 0) for rep in range(3)),
        *(_http(rep, "mesh_http", rps, 200.0, 0.2, 1001) for rep, rps in enumerate([2e3, 3e3])),
        sample(2, "mesh_http", "http", error="h2load exited 1: connect error"),
    ]
    done = results()
    done["samples"] += samples
    done["http_paths"] = http_paths
    done["settings"] |= {"http_clients": 8, "http_seconds": 3.0}
    values = summary.http_values(done)
    assert values["direct"]["rps"] == 10e3
    assert values["direct"]["cpu_us_per_request"] is None  # no proxy, not "free"
    assert values["mesh_l4"]["cpu_us_per_request"] == pytest.approx(100.0)  # 0.3 s / 3000
    assert values["mesh_http"]["rps"] == 2.5e3  # the failed repetition has no value
    assert (values["mesh_http"]["requests"], values["mesh_http"]["counted"]) == (2000, 2002)
    text = report.markdown(done, None)
    assert "## HTTP/1.1 keep-alive (`h2load --h1`, 8 connections, 3 s per repetition)" in text
    # The last column: one request at a time on one connection (medians: 10 + rep for L4).
    assert "| L4 | 4,000 | 100 | 200 | 400 | 100.0 | 0.40x | 3,000 / 0 | 11 / 50 |" in text
    assert "| HTTP | 2,500 | 200 | 400 | 800 | 200.0 | 0.25x | 2,000 / 2,002 | 20 / 100 |" in text
    assert "- mesh_http http rep 2: h2load exited 1: connect error" in text
    # The HTTP path's goals, against the L4 path of the same runs.
    assert (
        "nodemesh HTTP against nodemesh L4 (pod port): req/s 0.62x, p50 +100 µs (one at a time:"
        " +10 µs), agent CPU per request 2.00x."
    ) in text
    assert "HTTP/1.1 keep-alive" not in report.markdown(results(), None)
    assert "routed" not in text  # no routed path in these results: no line for it


def test_the_routed_path_is_compared_with_plain_http_via_a_service() -> None:
    done = results()
    done["http_paths"] = [
        {"key": "svc_http", "title": "Service HTTP", "proxy_pids": [1, 2]},
        {"key": "svc_routed", "title": "Service routed", "proxy_pids": [1, 2]},
    ]
    done["samples"] += [
        *(_http(rep, "svc_http", 2e3, 300.0, 0.3, 1000) for rep in range(3)),
        *(_http(rep, "svc_routed", 1.6e3, 380.0, 0.45, 1000) for rep in range(3)),
    ]
    done["settings"] |= {"http_clients": 8, "http_seconds": 3.0}
    text = report.markdown(done, None)
    assert (
        "| Service routed | 1,600 | 380 | 760 | 1,520 | 450.0 | — | 3,000 / 3,000 | 39 / 190 |"
    ) in text
    assert (
        "nodemesh HTTP routed (HTTPRoute) against plain via a Service: req/s 0.80x, p50 +80 µs"
        " (one at a time: +8 µs), agent CPU per request 1.50x."
    ) in text


def test_a_failed_one_at_a_time_run_is_a_failure_and_its_column_a_dash() -> None:
    done = results()
    done["http_paths"] = [
        {"key": "mesh_l4", "title": "L4", "proxy_pids": [1, 2]},
        {"key": "mesh_http", "title": "HTTP", "proxy_pids": [1, 2]},
    ]
    broken = {k: v for k, v in _http(0, "mesh_http", 2e3, 200.0, 0.2, 1000).items()}
    for field in ("single_p50_us", "single_p90_us", "single_p99_us"):
        del broken[field]
    broken["single_error"] = "1999 of 2000 succeeded"
    done["samples"] += [_http(0, "mesh_l4", 4e3, 100.0, 0.1, 0), broken]
    done["settings"] |= {"http_clients": 8, "http_seconds": 3.0, "http_single_requests": 2000}
    text = report.markdown(done, None)
    assert "| HTTP | 2,000 | 200 | 400 | 800 | 200.0 | — | 1,000 / 1,000 | — / — |" in text
    assert "(one at a time: — µs)" in text
    assert "- mesh_http http rep 0, one connection: 1999 of 2000 succeeded" in text
    assert "2,000 requests each sent when the last one's response ended" in text


def test_a_run_of_the_http_section_alone_shows_no_empty_tcp_tables() -> None:
    done = results()
    done["settings"] |= {"sections": "http", "http_clients": 8, "http_seconds": 3.0}
    done["idle"], done["openssl_speed"] = {}, []
    text = report.markdown(done, None)
    assert "Sections run: http (`--sections`)." in text
    assert "| metric | unit |" not in text
    assert "Idle connections" not in text and "Cipher ceiling" not in text
    assert "| metric | unit |" in report.markdown(results(), None)
