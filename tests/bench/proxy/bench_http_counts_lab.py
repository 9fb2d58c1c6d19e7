"""What one HTTP/1.1 request at a time costs each agent, in counts, on the bench's paths.

    sudo .venv/bin/python -m tests.bench.proxy.bench_http_counts_lab [--requests 3000] \
        [--paths mesh_l4,mesh_http,svc_l4,svc_http]

The machine is shared, so the one-at-a-time p50 moves with the load; counts do not. This builds
the bench's lab (``bench.testbed.Testbed``: the same pods, Services, HTTP server and agents as
``python -m bench --sections http``) and, for each path, sends ``h2load --h1 -c 1 -n
--requests`` (one request at a time on one connection, after a warm-up of 200) with ``perf
stat`` attached to each agent's process, and prints per request:

  - each agent's system calls by name (``perf stat`` of the ``sys_enter`` tracepoints):
    ``epoll_wait`` is the loop's passes that asked the kernel (one that found nothing ready
    and slept, or one that ran a scheduled callback and polled without waiting), ``sendto``/
    ``recvfrom`` the pod's and client's sockets, ``write``/``read`` the HBONE TLS connection;
  - each agent's CPU (user + system, from ``/proc``) and its voluntary context switches (the
    process's sleeps: real wake-ups, as against passes that polled without sleeping);
  - the TCP segments sent by each namespace on the path (``TcpOutSegs``), its pure ACKs and
    delayed ACKs;
  - h2load's p50 of the measured run (perf attached: compare counts, not this time).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import h2load
from bench.testbed import HttpPath, Testbed

COUNTERS = ("TcpOutSegs", "TcpExtDelayedACKs", "TcpExtTCPPureAcks")
SPACES = ("client", "node1", "node2", "server")


def tcp_counters(bed: Testbed, target: str) -> dict[str, int]:
    out = bed.the_lab.exec(target, "nstat", "-az", *COUNTERS, capture_output=True, text=True)
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


def h2load_run(bed: Testbed, path: HttpPath, n: int, log: Path | None) -> str:
    argv = ["h2load", "--h1", "-c", "1", "-t", "1", "-n", str(n)]
    if log is not None:
        log.unlink(missing_ok=True)
        argv.append(f"--log-file={log}")
    argv.append(f"http://{path.host}:{path.port}/")
    out = bed.the_lab.exec(path.client, *argv, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"h2load failed: {out.stderr.strip()[-300:]}")
    return out.stdout


def measure(bed: Testbed, path: HttpPath, n: int) -> dict[str, Any]:
    h2load_run(bed, path, 200, None)  # warm-up: the pool's dial and handshake, caches
    agents = dict(zip(("node1", "node2"), bed.agent_pids(), strict=True))
    before_tcp = {t: tcp_counters(bed, t) for t in SPACES}
    before = {node: proc_counts(pid) for node, pid in agents.items()}
    perfs = {}
    for node, pid in agents.items():
        argv = ["perf", "stat", "-x", ",", "-e", "syscalls:sys_enter_*", "-p", str(pid)]
        perfs[node] = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # perf attaches
    log = Path(bed.the_lab.state_dir) / "logs" / "bench-http-counts.log"
    stdout = h2load_run(bed, path, n, log)
    result: dict[str, Any] = {"path": path.key}
    for node, perf in perfs.items():
        os.kill(perf.pid, signal.SIGINT)
        _, err = perf.communicate()
        counts = {}
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].isdigit() and int(fields[0]):
                counts[fields[2].removeprefix("syscalls:sys_enter_")] = round(int(fields[0]) / n, 2)
        cpu, switches = proc_counts(agents[node])
        result[node] = {
            "cpu_us": round((cpu - before[node][0]) / n * 1e6, 1),
            "sleeps": round((switches - before[node][1]) / n, 2),
            "syscalls": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        }
    for target in SPACES:
        after = tcp_counters(bed, target)
        result[target + "_tcp"] = {
            k: round((after[k] - before_tcp[target][k]) / n, 2) for k in after
        }
    found = h2load.summary(stdout)
    times = sorted(h2load.latencies_us(log.read_text(encoding="ascii")))
    result["p50_us"] = times[len(times) // 2] if times else None
    result["succeeded"] = found["succeeded"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--paths", default="mesh_l4,mesh_http,svc_l4,svc_http")
    args = parser.parse_args()
    wanted = args.paths.split(",")
    with Testbed() as bed:
        time.sleep(1.0)
        for path in bed.http_paths:
            if path.key in wanted:
                print(json.dumps(measure(bed, path, args.requests)), flush=True)


if __name__ == "__main__":
    main()
