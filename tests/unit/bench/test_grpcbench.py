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
        "destination_counted_ok": int(rps * 3) if path == "mesh_grpc" else 0,
        "single_p50_us": rps / 100, "single_p99_us": rps / 50, **kw,
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
    assert row == (
        "| nodemesh gRPC | 2,000 | 200 | 400 | 1,000 | 800.0 | 0.44x | 6,000 / 6,000 | 20 / 40 |"
    )


def test_what_a_terminating_path_adds_over_l4_loaded_and_one_at_a_time() -> None:
    paths = [
        {"key": "mesh_l4", "title": "nodemesh L4", "address": "10.244.2.2:50052"},
        {
            "key": "mesh_grpc_vip",
            "title": "nodemesh gRPC via the VIP",
            "address": "10.96.0.9:50051",
        },
    ]
    failed = _sample("mesh_grpc_vip", 1, 2000, 400.0, single_error="h2load exited 1: reset")
    del failed["single_p50_us"], failed["single_p99_us"]
    found = {
        "settings": {"reps": 2, "seconds": 3.0, "warmup": 1.0, "clients": 8, "single_calls": 500},
        "paths": paths,
        "samples": [
            _sample("mesh_l4", 0, 5000, 100.0),
            _sample("mesh_grpc_vip", 0, 2000, 400.0),
            failed,
        ],
    }
    table = grpcbench.markdown(found)
    # Loaded p50 is rps / 10 (500 and 200 µs), one at a time rps / 100 (50 and 20 µs, from the
    # repetition whose one-at-a-time run did not fail).
    assert (
        "nodemesh gRPC via the Service VIP against nodemesh L4: p50 -300 µs,"
        " one at a time p50 -30 µs."
    ) in table
    assert "- mesh_grpc_vip rep 1, one at a time: h2load exited 1: reset" in table
    (row,) = [line for line in table if line.startswith("| nodemesh gRPC via the VIP |")]
    assert row.endswith("| 20 / 40 |")
    assert "500 calls each sent when the last one ended" in " ".join(table)


def test_a_section_that_failed_says_so_and_one_that_did_not_run_is_absent() -> None:
    assert grpcbench.markdown(None) == []
    assert grpcbench.markdown({"error": "lab up failed"})[-1] == "Not measured: lab up failed"
