"""`python -m bench` end to end in a tiny quick mode: well-formed output, every path verified.

Builds its own lab (random name; the harness removes it on exit, also on failure). Checks the
shape of results.json, summary.md and chart.png and that each path passed its wire and agent
checks; never a timing.
"""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from agent.lab.handle import Lab

pytestmark = [pytest.mark.root, pytest.mark.lab]
REPO = Path(__file__).resolve().parents[3]
TINY = [
    "--quick", "--reps", "1", "--bulk-seconds", "1", "--bulk-omit", "0", "--rr-count", "100",
    "--rr-warmup", "10", "--conn-seconds", "0.3", "--conn-warmup", "0", "--idle-steps", "20,50",
    "--speed-seconds", "1", "--upgrade-long-lived", "8", "--upgrade-new-per-second", "2",
    "--upgrade-settle-seconds", "1", "--http-seconds", "0.5", "--http-warmup", "0.2",
    "--http-clients", "2", "--grpc-seconds", "0.5", "--grpc-warmup", "0.2", "--grpc-clients", "2",
    # every section but scaling (four more agent restarts): bench/scaling.py is run by hand
    "--sections", "idle,tcp,http,upgrade,grpc",
]  # fmt: skip
PATHS = {"direct", "mesh_cross", "mesh_same", "stunnel"}
WORKLOADS = {"bulk_1", "bulk_4", "rr", "conn"}
HTTP_PATHS = {"direct", "mesh_l4", "mesh_http", "svc_l4", "svc_http", "svc_routed"}


def test_quick_mode_writes_well_formed_results(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the bench builds a lab: needs root")
    name = "bt" + secrets.token_hex(3)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench", *TINY, "--out", str(tmp_path), "--lab", name],
            cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        Lab(name).down()  # the harness removes it itself; this covers a killed harness
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())

    assert {p["key"] for p in results["paths"]} == PATHS
    for p in results["paths"]:
        assert p["verification"]["ok"], (p["key"], p["verification"]["checks"])
    tls = {p["key"]: p["verification"] for p in results["paths"] if p["wire"] == "tls"}
    assert set(tls) == {"mesh_cross", "stunnel"}
    assert all(v["tls_version"] == "TLSv1.3" and v["speed_cipher"] for v in tls.values())

    done_pairs = {(s["path"], s["workload"]) for s in results["samples"] if "error" not in s}
    assert done_pairs == {(p, w) for p in PATHS for w in WORKLOADS} | {
        (p, "http") for p in HTTP_PATHS
    }
    grpc = results["grpc"]["samples"]
    declared = {"mesh_grpc", "mesh_grpc_vip"}
    assert {s["path"] for s in grpc if "error" not in s} == {"direct", "mesh_l4", *declared}
    for s in grpc:  # node2's agent counts the declared port's calls, and only those
        assert (s["destination_counted_ok"] >= s["succeeded"]) == (s["path"] in declared)
    rr = next(s for s in results["samples"] if s["workload"] == "rr")
    assert len(rr["samples_us"]) == 100
    assert rr["p50_us"] <= rr["p99_us"] <= rr["p99.9_us"]
    for key in ("mesh_cross", "mesh_same", "stunnel"):
        steps = results["idle"][key]["steps"]
        assert [s["open"] for s in steps] == [0, 20, 50]
        assert all(s["rss_bytes"] > 0 for s in steps)
    assert all("bytes_per_second" in s for s in results["openssl_speed"])
    assert {p["key"]: p["declared"] for p in results["http_paths"]} == {
        "direct": False, "mesh_l4": False, "mesh_http": True, "svc_l4": False, "svc_http": True,
        "svc_routed": True,
    }  # fmt: skip
    http = {s["path"]: s for s in results["samples"] if s["workload"] == "http"}
    for key, sample in http.items():
        assert sample["succeeded"] == sample["requests"] > 0, (key, sample)
        assert sample["status"]["2xx"] == sample["requests"]
        assert 0 < sample["p50_us"] <= sample["p90_us"] <= sample["p99_us"]
    # node2's agent parsed and counted every request on the declared port, none on the L4 one.
    assert http["mesh_http"]["destination_counted"] >= http["mesh_http"]["requests"]
    assert http["svc_http"]["destination_counted"] >= http["svc_http"]["requests"]
    assert http["svc_routed"]["destination_counted"] >= http["svc_routed"]["requests"]
    # node1's agent routed every request of the routed path by its HTTPRoute, 90/10 (4 sd
    # around 10 % to bench-v2), and no other path's.
    routed = http["svc_routed"]["route_backends"]
    sent = routed.get("default/bench-v1", 0) + routed.get("default/bench-v2", 0)
    assert set(routed) <= {"default/bench-v1", "default/bench-v2"}
    assert sent >= http["svc_routed"]["requests"]
    assert abs(routed.get("default/bench-v2", 0) - 0.1 * sent) <= 4 * (0.09 * sent) ** 0.5
    assert all(not s["route_backends"] for k, s in http.items() if k != "svc_routed")
    assert http["mesh_l4"]["destination_counted"] == 0
    assert http["svc_l4"]["destination_counted"] == 0
    assert http["direct"]["destination_counted"] == 0
    agents = [(a["node"], a["moment"], a["programs"]) for a in results["agents"]]
    assert agents == [
        ("node1", "lab up", "compiled"), ("node2", "lab up", "compiled"),
        ("node1", "--workers 2", "adopted"), ("node1", "restarted", "adopted"),
    ]  # fmt: skip
    assert all(a["rss_bytes"] > 0 for a in results["agents"])
    for a in results["agents"]:  # the agent process, its workers if any, its netlink helper
        workers = ["agent.workers.worker"] * (2 if a["moment"] == "--workers 2" else 0)
        roles = [p["role"] for p in a["processes"]]
        assert roles[0] == "main" and sorted(roles[1:]) == sorted(
            ["agent.datapath.netlinkd", *workers]
        ), (a["moment"], roles)
        assert all(0 < p["pss_bytes"] <= p["rss_bytes"] for p in a["processes"])

    phases = results["upgrade"]["phases"]
    assert set(phases) == {"baseline", "node1", "node2"}
    assert phases["baseline"]["upgrade"] is None
    assert all(phases[n]["upgrade"]["node"] == n for n in ("node1", "node2"))
    assert all(ph["long_lived"] == 8 and ph["new_ok"] > 0 for ph in phases.values())

    summary = (tmp_path / "summary.md").read_text()
    assert "## Agent upgrades under load" in summary
    assert "## Idle agents: RSS per process" in summary
    assert "| metric | unit | direct (no mesh) | nodemesh cross-node |" in summary
    assert "## HTTP/1.1 keep-alive (`h2load --h1`, 2 connections, 0.5 s per repetition)" in summary
    assert "| nodemesh HTTP (declared port) | " in summary
    assert "untrusted" not in summary.lower()
    assert "## Failures" not in summary
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
