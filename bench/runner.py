"""One benchmark run: build the testbed, verify every path, then measure, interleaved.

Order of a run:

1. the testbed (lab, servers, stunnel4), then every path verified (``bench.verify``) before it
   carries anything else, so the capture sees each path's first TLS handshake;
2. idle-connection memory on fresh proxies (and each agent's own RSS before any connection, per
   process: at lab up, with node1's agent restarted with ``--workers 2`` (main, each worker, the
   netlink helper), and after node1's restart): nodemesh cross-node, stunnel4, then nodemesh
   same-node after node1's agent was restarted (Python keeps the memory of the cross-node test's
   connections for reuse, which would hide the same-node test's growth);
3. ``reps`` repetitions of every throughput / latency / connection-rate workload over every path,
   the path order rotated each repetition, so that drift of a shared machine (other engineers'
   tests, CPU frequency, page cache) spreads over all paths instead of landing on one; then, in
   the same repetition, the HTTP/1.1 keep-alive workload over its three paths (direct, nodemesh
   L4, nodemesh HTTP), rotated the same way;
4. after the lab is gone, ``openssl speed`` for each cipher the TLS paths negotiated;
5. the upgrade section (``bench.upgrade``) in a lab of its own: live streams and new connections
   across ``nodemesh lab upgrade node1`` and ``node2``;
6. the gRPC section (``bench.grpcbench``) in a lab of its own: unary calls over direct,
   nodemesh L4 and nodemesh gRPC (a port declared ``appProtocol: grpc``).

``--sections`` (``Settings.sections``) runs a subset: ``idle`` (2), ``tcp`` (3's TCP workloads
and 4), ``http`` (3's HTTP/1.1 workload), ``upgrade`` (5), ``grpc`` (6), ``scaling`` (after 3,
in the same lab: ``bench.scaling``, the mesh paths with 1 and 2 proxy workers per agent); the
paths are verified in every run.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from typing import Any

from agent.lab.topology import LabError
from bench import grpcbench, machine, procstat, scaling, upgrade, workloads
from bench.settings import Settings
from bench.testbed import REPO, BenchPath, Testbed
from bench.verify import verify

Workload = Callable[[Testbed, BenchPath, Settings], dict[str, Any]]


def _workloads(s: Settings) -> list[tuple[str, Workload]]:
    return [
        ("bulk_1", lambda bed, p, st: workloads.bulk(bed, p, st, 1)),
        (f"bulk_{s.streams}", lambda bed, p, st: workloads.bulk(bed, p, st, st.streams)),
        ("rr", workloads.request_response),
        ("conn", workloads.connection_rate),
    ]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _headline(workload: str, sample: dict[str, Any]) -> str:
    if "error" in sample:
        return "ERROR " + str(sample["error"])
    if workload.startswith("bulk_"):
        return f"{sample['gbps']:.2f} Gbit/s, proxy CPU {sample['proxy_cpu_s']:.1f} s"
    if workload == "rr":
        return f"p50 {sample['p50_us']:.0f} µs, p99 {sample['p99_us']:.0f} µs"
    if workload == "http":
        return (
            f"{sample['rps']:,.0f} req/s, p50 {sample['p50_us']:.0f} µs, p99 "
            f"{sample['p99_us']:.0f} µs, node2's agent counted "
            f"{sample['destination_counted']:.0f}"
        )
    cpu = sample.get("proxy_cpu_us_per_connection")
    per = f", proxy CPU {cpu:.0f} µs per connection" if cpu is not None else ""
    return f"{sample['rate']:.0f} conn/s{per}, errors {sample['errors'] or 'none'}"


def run(s: Settings, *, lab: str | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {
        "version": 1,
        "started": _now(),
        "settings": s.as_dict(),
        "machine": machine.describe(),
        "code": machine.code_version(str(REPO)),
        "load": {"before": [round(x, 2) for x in procstat.load_average()]},
        "samples": [],
        "idle": {},
        "agents": [],
    }
    say("building the lab (2 nodes, agents, CA, echo and iperf3 servers, stunnel4)")
    with Testbed(lab) as bed:
        if s.agent_args:
            say(f"restarting both agents with {s.agent_args}")
            for node in ("node1", "node2"):
                bed.restart_agent(node, extra=tuple(s.agent_args.split()))
        for node in ("node1", "node2"):
            results["agents"].append(workloads.idle_agent(bed, node, "lab up"))
        results["paths"] = []
        for path in bed.paths:
            verdict = verify(bed, path, size=s.marker_bytes)
            state = "verified" if verdict.ok else "UNTRUSTED"
            say(f"{path.title}: {state}: {'; '.join(verdict.checks)}")
            results["paths"].append({
                "key": path.key, "title": path.title, "client": path.client, "target": path.target,
                "address": f"{path.host}:{path.echo_port}", "proxy_pids": list(path.proxy_pids),
                "wire": path.wire, "verification": verdict.__dict__,
            })  # fmt: skip
        results["http_paths"] = [
            {"key": p.key, "title": p.title, "client": p.client, "address": f"{p.host}:{p.port}",
             "proxy_pids": list(p.proxy_pids), "declared": p.declared}
            for p in bed.http_paths
        ]  # fmt: skip
        for key in ("mesh_cross", "stunnel", "mesh_same") if s.runs("idle") else ():
            if key == "mesh_same":
                bed.restart_agent("node1", workers=2)  # idle RSS of the main, each worker, helper
                results["agents"].append(workloads.idle_agent(bed, "node1", "--workers 2"))
                bed.restart_agent("node1", workers=1)  # fresh after the cross-node test's 10,000
                results["agents"].append(workloads.idle_agent(bed, "node1", "restarted"))
            path = next(p for p in bed.paths if p.key == key)
            say(f"{path.title}: idle connections {list(s.idle_steps)}")
            idle = workloads.idle_memory(bed, path, s)
            results["idle"][key] = idle
            per = idle.get("bytes_per_connection")
            say(f"  {'%.1f KiB per connection' % (per / 1024) if per else idle.get('error')}")
        for rep in range(s.reps):
            shift = rep % len(bed.paths)
            for path in bed.paths[shift:] + bed.paths[:shift] if s.runs("tcp") else []:
                for name, workload in _workloads(s):
                    sample = workload(bed, path, s)
                    load1 = round(procstat.load_average()[0], 2)  # how busy the shared machine was
                    results["samples"].append(
                        {"rep": rep, "path": path.key, "workload": name, "load1": load1, **sample}
                    )
                    say(f"[{rep + 1}/{s.reps}] {path.title} {name}: {_headline(name, sample)}")
            shift = rep % len(bed.http_paths)
            for hpath in bed.http_paths[shift:] + bed.http_paths[:shift] if s.runs("http") else []:
                sample = workloads.http_keepalive(bed, hpath, s)
                load1 = round(procstat.load_average()[0], 2)
                results["samples"].append(
                    {"rep": rep, "path": hpath.key, "workload": "http", "load1": load1, **sample}
                )
                say(f"[{rep + 1}/{s.reps}] {hpath.title} http: {_headline('http', sample)}")
        if s.runs("scaling"):
            say("scaling: both agents with 1 and 2 proxy workers")
            results["scaling"] = scaling.section(bed, s, say)
    results["openssl_speed"] = _speeds(results, s) if s.runs("tcp") else []
    if s.runs("upgrade"):
        results["upgrade"] = _upgrade(s)
    if s.runs("grpc"):
        results["grpc"] = _grpc(s)
    results["load"]["after"] = [round(x, 2) for x in procstat.load_average()]
    results["finished"] = _now()
    return results


def _upgrade(s: Settings) -> dict[str, Any]:
    say(
        f"upgrade: {s.upgrade_long_lived} live streams and new connections across "
        "`nodemesh lab upgrade` of node1, then node2 (a lab of its own)"
    )
    chosen = upgrade.UpgradeSettings(
        long_lived=s.upgrade_long_lived,
        new_per_second=s.upgrade_new_per_second,
        settle_seconds=s.upgrade_settle_seconds,
    )
    try:
        found = upgrade.section(chosen)
    except (OSError, RuntimeError, LabError) as e:
        say(f"upgrade: ERROR {e}")
        return {"error": str(e)}
    for name, phase in found["phases"].items():
        say(f"upgrade {name}: {upgrade.headline(phase)}")
    return found


def _grpc(s: Settings) -> dict[str, Any]:
    say("grpc: unary calls over direct, nodemesh L4 and nodemesh gRPC (a lab of its own)")
    chosen = grpcbench.GrpcSettings(
        reps=s.reps,
        seconds=s.grpc_seconds,
        warmup=s.grpc_warmup,
        clients=s.grpc_clients,
        single_calls=s.grpc_single_calls,
    )
    try:
        return grpcbench.section(chosen, say)
    except (OSError, RuntimeError, LabError) as e:
        say(f"grpc: ERROR {e}")
        return {"error": str(e)}


def _speeds(results: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    ciphers: dict[str, list[str]] = {}
    for path in results["paths"]:
        v = path["verification"]
        if v["speed_cipher"]:
            ciphers.setdefault(v["speed_cipher"], []).append(f"{path['title']}: {v['cipher']}")
    out = []
    for cipher, users in ciphers.items():
        entry: dict[str, Any] = {"cipher": cipher, "negotiated_by": users}
        try:
            entry["bytes_per_second"] = machine.openssl_speed(cipher, s.speed_seconds)
        except RuntimeError as e:
            entry["error"] = str(e)
        out.append(entry)
    return out
