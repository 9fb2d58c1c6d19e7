"""What one HTTP/1.1 request at a time costs each agent, in counts, on the bench's paths.

    sudo .venv/bin/python -m tests.bench.proxy.bench_http_counts_lab [--requests 3000] \
        [--paths mesh_l4,mesh_http,svc_l4,svc_http]
    sudo .venv/bin/python -m tests.bench.proxy.bench_http_counts_lab --grpc \
        [--paths mesh_l4,mesh_grpc,mesh_grpc_vip]

The machine is shared, so the one-at-a-time p50 moves with the load; counts do not. This builds
the bench's lab (``bench.testbed.Testbed``: the same pods, Services, HTTP server and agents as
``python -m bench --sections http``; with ``--grpc`` the gRPC section's lab, servers and
``h2load`` unary calls, ``bench.grpcbench``) and, for each path, sends ``h2load -c 1 -n
--requests`` (one request at a time on one connection, after a warm-up of 200) and prints per
request:

  - each agent's system calls by name (``perf stat`` of the ``sys_enter`` tracepoints, in a
    second run of as many requests, since ``perf`` slows the agents; those of at least one
    per 20 requests): ``epoll_pwait`` is the loop's polls, ``sendto``/``recvfrom`` the pod's
    and client's sockets, ``write``/``read`` the HBONE TLS connection;
  - each agent's CPU (user + system, from ``/proc``) and its voluntary context switches (the
    process's sleeps: real wake-ups, as against passes that polled without sleeping);
  - the TCP segments sent by each namespace on the path (``TcpOutSegs``), its pure ACKs and
    delayed ACKs;
  - h2load's p50 of each run (compare counts, not this time: the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.lab.handle import Lab
from bench import grpcbench, h2load
from bench.testbed import HttpPath, Testbed

COUNTERS = ("TcpOutSegs", "TcpExtDelayedACKs", "TcpExtTCPPureAcks")
SPACES = ("client", "node1", "node2", "server")
# ``run(n, log)``: ``n`` requests one at a time, h2load's log written to ``log`` when given
Run = Callable[[int, Path | None], str]


def tcp_counters(lab: Lab, target: str) -> dict[str, int]:
    out = lab.exec(target, "nstat", "-az", *COUNTERS, capture_output=True, text=True)
    return {f[0]: int(f[1]) for f in (line.split() for line in out.stdout.splitlines()[1:])}


def proc_counts(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, voluntary context switches) of every thread of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                switches += int(line.split()[1])
    return cpu, switches


def agent_pids(lab: Lab) -> dict[str, int]:
    pids = Path(lab.state_dir) / "pids"
    return {n: int((pids / f"agent-{n}").read_text()) for n in ("node1", "node2")}


def http_run(bed: Testbed, path: HttpPath) -> Run:
    def run(n: int, log: Path | None) -> str:
        argv = ["h2load", "--h1", "-c", "1", "-t", "1", "-n", str(n)]
        if log is not None:
            argv.append(f"--log-file={log}")
        argv.append(f"http://{path.host}:{path.port}/")
        out = bed.the_lab.exec(path.client, *argv, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"h2load failed: {out.stderr.strip()[-300:]}")
        return out.stdout

    return run


def grpc_run(lab: Lab, path: grpcbench.GrpcPath, body: Path) -> Run:
    def run(n: int, log: Path | None) -> str:
        args = ["-c", "1", "-n", str(n), *([f"--log-file={log}"] if log is not None else [])]
        return grpcbench._h2load(lab, path, args, body, 300.0)

    return run


def measure(lab: Lab, key: str, run: Run, n: int, *, perf: bool) -> dict[str, Any]:
    """``n`` requests after a warm-up of 200: each agent's CPU and sleeps per request, each
    namespace's TCP segments, h2load's p50, and with ``perf`` each agent's system calls."""
    run(200, None)  # warm-up: the pool's dial and handshake, caches
    agents = agent_pids(lab)
    before_tcp = {t: tcp_counters(lab, t) for t in SPACES}
    before = {node: proc_counts(pid) for node, pid in agents.items()}
    perfs = {}
    if perf:
        for node, pid in agents.items():
            argv = ["perf", "stat", "-x", ",", "-e", "syscalls:sys_enter_*", "-p", str(pid)]
            perfs[node] = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # perf attaches
    log = Path(lab.state_dir) / "logs" / "bench-counts-h2load.log"
    log.unlink(missing_ok=True)  # h2load appends
    stdout = run(n, log)
    result: dict[str, Any] = {"path": key, "perf": perf}
    for node, pid in agents.items():
        cpu, switches = proc_counts(pid)
        result[node] = {
            "cpu_us": round((cpu - before[node][0]) / n * 1e6, 1),
            "sleeps": round((switches - before[node][1]) / n, 2),
        }
    for node, proc in perfs.items():
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate()
        counts = {}
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].isdigit() and int(fields[0]) >= n // 20:
                name = fields[2].removeprefix("syscalls:sys_enter_")
                counts[name] = round(int(fields[0]) / n, 2)
        result[node]["syscalls"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    for target in SPACES:
        after = tcp_counters(lab, target)
        result[target + "_tcp"] = {
            k: round((after[k] - before_tcp[target][k]) / n, 2) for k in after
        }
    found = h2load.summary(stdout)
    times = sorted(h2load.latencies_us(log.read_text(encoding="ascii")))
    result["p50_us"] = times[len(times) // 2] if times else None
    result["succeeded"] = found["succeeded"]
    return result


PROFILES: Path | None = None  # --py-spy: where each agent's profile of each path goes


def both(lab: Lab, key: str, run: Run, n: int) -> None:
    """One run without ``perf`` (CPU, sleeps, p50 undisturbed by it), one with it; with
    ``--py-spy`` a third, each agent sampled by ``py-spy`` (collapsed stacks per path)."""
    for perf in (False, True):
        print(json.dumps(measure(lab, key, run, n, perf=perf)), flush=True)
    if PROFILES is not None:
        spies = []
        for node, pid in agent_pids(lab).items():
            out = PROFILES / f"{key}-{node}.txt"
            argv = [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "-r",
                "2000",
                "-f",
                "raw",
                "-p",
                str(pid),
                "-o",
                str(out),
            ]
            spies.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        time.sleep(1.0)
        run(n, None)
        for spy in spies:
            os.kill(spy.pid, signal.SIGINT)
            spy.wait()


def http_section(wanted: list[str], n: int) -> None:
    with Testbed() as bed:
        time.sleep(1.0)
        for path in bed.http_paths:
            if path.key in wanted:
                both(bed.the_lab, path.key, http_run(bed, path), n)


def grpc_section(wanted: list[str], n: int) -> None:
    """The gRPC section's lab (``bench.grpcbench.section``, without its repetitions)."""
    lab = Lab.up("bg" + secrets.token_hex(3), topology=grpcbench.TOPOLOGY, timeout=120)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for pod, port in (
            ("server", grpcbench.GRPC_PORT),
            ("server", grpcbench.GRPC_L4_PORT),
            ("plain", grpcbench.GRPC_PORT),
        ):
            servers.append(grpcbench._server(lab, pod, port))
        body = Path(lab.state_dir) / "bench-grpc-body.bin"
        body.write_bytes(grpcbench.BODY)
        for path in grpcbench._paths(lab):
            if path.declared:
                grpcbench._converge(lab, path, body)
            if path.key in wanted:
                both(lab, path.key, grpc_run(lab, path, body), n)
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        lab.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--grpc", action="store_true", help="the gRPC section's paths")
    parser.add_argument("--paths", help="comma-separated path keys (default: the mesh's)")
    parser.add_argument("--py-spy", type=Path, help="a directory for each agent's profiles")
    args = parser.parse_args()
    if args.py_spy is not None:
        global PROFILES
        PROFILES = args.py_spy
        PROFILES.mkdir(parents=True, exist_ok=True)
    if args.grpc:
        grpc_section((args.paths or "mesh_l4,mesh_grpc,mesh_grpc_vip").split(","), args.requests)
    else:
        http_section((args.paths or "mesh_l4,mesh_http,svc_l4,svc_http").split(","), args.requests)


if __name__ == "__main__":
    main()
