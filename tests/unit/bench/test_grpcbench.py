"""The gRPC section's arithmetic and table, from samples (no lab)."""

from __future__ import annotations

from typing import Any

from bench import grpcbench

PATHS = [
    {"key": "direct", "title": "direct (no mesh)", "address": "10.244.2.3:50051"},
    {"key": "mesh_grpc", "title": "nodemesh gRPC", "address": "10.244.2.2:50051"},
]


def _sample(path: str, rep: int, rps: float, cpu: float | None, **kw: Any) -> dict[str, Any]:
    return {
        "rep": rep, "path": path, "rps": rps, "requests": int(rps * 3), "p50_us": rps / 10,
        "p90_us": rps / 5, "p99_us": rps / 2, "cpu_us_per_call": cpu,
        "destination_counted_ok": int(rps * 3) if path == "mesh_grpc" else 0, **kw,
    }  # fmt: skip


def test_medians_skip_failed_repetitions_and_direct_has_no_agent_cpu() -> None:
    found = {
        "settings": {"reps": 3, "seconds": 3.0, "warmup": 1.0, "clients": 8},
        "paths": PATHS,
        "samples": [
            _sample("direct", 0, 4000, None),
            _sample("direct", 1, 5000, None),
            {"rep": 2, "path": "direct", "error": "h2load exited 1"},
            _sample("mesh_grpc", 0, 1000, 900.0),
            _sample("mesh_grpc", 1, 2000, 700.0),
            _sample("mesh_grpc", 2, 3000, 800.0),
        ],
    }
    v = grpcbench.values(found)
    assert v["direct"]["rps"] == 4500 and v["direct"]["cpu_us_per_call"] is None
    assert v["mesh_grpc"]["rps"] == 2000 and v["mesh_grpc"]["cpu_us_per_call"] == 800.0
    table = grpcbench.markdown(found)
    (row,) = [line for line in table if line.startswith("| nodemesh gRPC |")]
    assert row == "| nodemesh gRPC | 2,000 | 200 | 400 | 1,000 | 800.0 | 0.44x | 6,000 / 6,000 |"


def test_a_section_that_failed_says_so_and_one_that_did_not_run_is_absent() -> None:
    assert grpcbench.markdown(None) == []
    assert grpcbench.markdown({"error": "lab up failed"})[-1] == "Not measured: lab up failed"
