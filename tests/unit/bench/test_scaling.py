"""The scaling section's summary: medians per (path, workload, workers) and its table."""

from __future__ import annotations

import pytest

from bench import scaling


def sample(
    workers: int, workload: str, value: float, cpu: float, rep: int = 0
) -> dict[str, object]:
    base = {"rep": rep, "workers": workers, "path": "mesh_cross", "workload": workload,
            "proxy_cpu_s": cpu}  # fmt: skip
    if workload.startswith("bulk_"):
        return {**base, "gbps": value}
    return {**base, "p50_us": value, "p99_us": value * 2}


def test_medians_and_table() -> None:
    found = {
        "workers": [1, 2],
        "samples": [
            sample(1, "bulk_4", 2.0, 1.0),
            sample(1, "bulk_4", 4.0, 3.0, rep=1),
            sample(2, "bulk_4", 6.0, 2.0),
            sample(2, "rr", 120.0, 0.5),
            {"workers": 1, "path": "mesh_cross", "workload": "rr", "error": "iperf3 failed"},
        ],
    }
    table = scaling.medians(found)
    assert table[("mesh_cross", "bulk_4", 1)] == {"cpu": 2.0, "gbps": 3.0}
    assert table[("mesh_cross", "rr", 2)] == {"cpu": 0.5, "p50": 120.0, "p99": 240.0}
    assert ("mesh_cross", "rr", 1) not in table
    text = "\n".join(scaling.markdown(found))
    assert "| mesh_cross | bulk_4 | 3.00 Gbit/s | 6.00 Gbit/s | 2.00x | 2.0 / 2.0 |" in text
    assert "| mesh_cross | rr | - | 120 µs p50 | - | 0.0 / 0.5 |" in text
    assert scaling.markdown(None) == [] and scaling.markdown({"samples": []}) == []


def test_a_sample_counts_the_workers_and_never_a_child_that_comes_and_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The key child leaves seconds after start-up: counting it made a sample read the
    ``/proc`` entry of a process that was gone (the full bench stopped on it)."""
    roles = {10: scaling.WORKER, 11: "agent.identity.keysmith", 12: "agent.datapath.netlinkd"}

    def role(pid: int) -> str:
        if pid == 13:
            raise FileNotFoundError(f"/proc/{pid}/cmdline")  # exited between the two reads
        return roles[pid]

    monkeypatch.setattr(scaling.procstat, "children", lambda pid: [10, 11, 12, 13])
    monkeypatch.setattr(scaling.procstat, "role", role)
    assert scaling._workers(1) == [10]
