"""The workloads, each run once on one path: the client in the path's client pod, the proxy's
CPU and memory read from /proc around it.

Every function returns one JSON-ready sample; a failure (a path that resets, a tool that exits
non-zero) is returned as ``{"error": ...}`` rather than raised, so one broken path does not take
the other paths' numbers with it and the report shows what went wrong.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.base.constants import ADMIN_PORT, METRICS_PORT
from agent.lab import netns
from bench import h2load, procstat, stats
from bench.settings import Settings
from bench.testbed import BenchPath, HttpPath, Testbed, stop

KEY_CHILD = "agent.identity.keysmith"

RR_POINTS = (50, 90, 99, 99.9)
HTTP_POINTS = (50, 90, 99)


def _run(bed: Testbed, path: BenchPath, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run a client to completion in the path's client pod; its JSON output plus proxy CPU."""
    cpu_before = procstat.total_cpu(path.proxy_pids)
    proc = bed.popen(path.client, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        return {"error": f"{argv[0]} did not finish within {timeout:.0f}s"}
    finally:
        bed.procs.remove(proc)
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        return {"error": f"{' '.join(argv[:3])} exited {proc.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(out)
    result["proxy_cpu_s"] = procstat.total_cpu(path.proxy_pids) - cpu_before
    return result


def bulk(bed: Testbed, path: BenchPath, s: Settings, streams: int) -> dict[str, Any]:
    """iperf3 for ``s.bulk_seconds`` with ``streams`` parallel streams, client to server."""
    argv = [
        "iperf3", "-J", "-c", path.host, "-p", str(path.iperf_port), "-t", str(s.bulk_seconds),
        "-O", str(s.bulk_omit), "-P", str(streams),
    ]  # fmt: skip
    raw = _run(bed, path, argv, timeout=s.bulk_seconds + s.bulk_omit + 60)
    if "error" in raw:
        return raw
    if "end" not in raw or "sum_received" not in raw["end"]:
        return {"error": f"iperf3: {raw.get('error', 'no summary in its output')}"}
    received = raw["end"]["sum_received"]
    return {
        "gbps": received["bits_per_second"] / 1e9,
        "bytes": received["bytes"],
        "seconds": received["seconds"],
        "proxy_cpu_s": raw["proxy_cpu_s"],
        "retransmits": raw["end"].get("sum_sent", {}).get("retransmits"),
    }


def request_response(bed: Testbed, path: BenchPath, s: Settings) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "bench.programs.rr_client", "--host", path.host,
        "--port", str(path.echo_port), "--count", str(s.rr_count),
        "--warmup", str(s.rr_warmup), "--size", str(s.rr_size),
    ]  # fmt: skip
    raw = _run(bed, path, argv, timeout=120 + s.rr_count * 0.01)
    if "error" in raw:
        return raw
    samples = raw["samples_us"]
    return {
        **{f"{k}_us": v for k, v in stats.percentiles(samples, RR_POINTS).items()},
        "mean_us": sum(samples) / len(samples),
        "proxy_cpu_s": raw["proxy_cpu_s"],
        "samples_us": samples,
    }


def connection_rate(bed: Testbed, path: BenchPath, s: Settings) -> dict[str, Any]:
    """New connections per second, and the proxies' CPU per connection: their CPU over the run
    (warm-up included) over every connection the client completed in it."""
    argv = [
        sys.executable, "-m", "bench.programs.connrate_client", "--host", path.host,
        "--port", str(path.echo_port), "--seconds", str(s.conn_seconds),
        "--warmup", str(s.conn_warmup), "--concurrency", str(s.conn_concurrency),
        "--size", str(s.conn_size),
    ]  # fmt: skip
    echo = [bed.echo_pids[path.target]] if path.target in bed.echo_pids else []
    echo_before = procstat.total_cpu(echo)
    raw = _run(bed, path, argv, timeout=s.conn_seconds + s.conn_warmup + 60)
    if "error" in raw or not raw["completed"]:
        return raw
    if path.proxy_pids:
        raw["proxy_cpu_us_per_connection"] = raw["proxy_cpu_s"] / raw["completed"] * 1e6
    # the load generator's share of the same cores: the client's own CPU (it reports it) and
    # the echo server's
    if echo:
        raw["server_cpu_s"] = procstat.total_cpu(echo) - echo_before
    return raw


def agent_admits(bed: Testbed) -> int | None:
    """The connections node1's agent admits from one pod through 15001 at once: the least of
    its per-process and per-pod caps (``/config_dump``), or None from an agent without them."""
    status, body = netns.http_get(
        bed.the_lab.netns("node1"), "127.0.0.1", ADMIN_PORT, "/config_dump", timeout=10.0
    )
    if status != 200:
        raise RuntimeError(f"node1's admin API answered {status} on /config_dump: {body[:200]}")
    config = json.loads(body).get("config", {})
    caps = [
        value
        for key in ("max_connections_per_process", "max_connections_per_pod_per_process")
        if isinstance(value := config.get(key), int)
    ]
    return min(caps) if caps else None


def idle_memory(bed: Testbed, path: BenchPath, s: Settings) -> dict[str, Any]:
    """RSS of the path's proxies at each step of idle connections, from a baseline at zero.

    The steps grow one client's set of held connections; a step is recorded only with the count
    actually open (errors are reported), and memory per connection is the least-squares slope of
    RSS over the open count, baseline included. Steps are capped below the proxies' open-files
    limit: a proxy that runs out of descriptors measures its failure handling, not its memory
    (the same-node path and stunnel hold two sockets per connection in one process). On a mesh
    path they are also capped at what node1's agent admits from one pod (its connection caps,
    from the open-files limit: ``agent.base.conncaps``), which refuses the rest at once.
    """
    reserve = 300  # listeners, pooled connections, files, BPF maps
    limit = min(procstat.open_files_limit(pid) for pid in path.proxy_pids)
    capacity = (limit - reserve) // path.fds_per_connection
    admitted = agent_admits(bed) if path.agent_path is not None else None
    capped_by = "the proxy's open-files limit"
    if admitted is not None and admitted < capacity:
        capacity, capped_by = admitted, "node1's agent's connection caps per pod and process"
    targets = sorted({min(target, capacity) for target in s.idle_steps})
    proc = bed.popen(
        path.client, sys.executable, "-m", "bench.programs.idle_client", "--host", path.host,
        "--port", str(path.echo_port), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    steps: list[dict[str, Any]] = [
        {"open": 0, "rss_bytes": procstat.total_rss(path.proxy_pids), "errors": {}}
    ]
    try:
        for target in targets:
            proc.stdin.write(f"{target}\n".encode())
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                return {"steps": steps, "error": f"idle client exited at step {target}"}
            step = json.loads(line)
            step["target"] = target
            time.sleep(0.5)  # let the far side's proxy finish its bookkeeping
            step["rss_bytes"] = procstat.total_rss(path.proxy_pids)
            steps.append(step)
    finally:
        proc.stdin.close()  # end of input: the client closes its connections and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        stop(proc)
        bed.procs.remove(proc)
    per_connection = stats.slope([(st["open"], st["rss_bytes"]) for st in steps])
    capped = (
        {"capped_at": capacity, "open_files_limit": limit, "capped_by": capped_by}
        if targets[-1] < max(s.idle_steps)
        else {}
    )
    return {"steps": steps, "bytes_per_connection": per_connection, **capped}


def idle_agent(bed: Testbed, node: str, moment: str) -> dict[str, Any]:
    """Memory of ``node``'s agent with no proxied connection, per process (the agent and its
    children, such as the netlink helper), and whether it compiled its programs at start-up or
    adopted pinned ones (its admin API's ``/datapath``): a process that ever mapped BCC's LLVM
    would keep it, so both cases are worth a figure. ``rss_bytes`` is the agent process's own."""
    pid = dict(zip(("node1", "node2"), bed.agent_pids(), strict=True))[node]
    status, body = netns.http_get(
        bed.the_lab.netns(node), "127.0.0.1", ADMIN_PORT, "/datapath", timeout=5.0
    )
    if status != 200:
        return {"node": node, "moment": moment, "error": f"/datapath answered {status}"}
    adopted = bool(json.loads(body)["datapath"]["adopted"])
    _wait_key_child_gone(pid)
    processes = procstat.tree_memory(pid)
    return {
        "node": node,
        "moment": moment,
        "pid": pid,
        "programs": "adopted" if adopted else "compiled",
        "rss_bytes": processes[0]["rss_bytes"],
        "processes": processes,
    }


def _wait_key_child_gone(pid: int, timeout: float = 20.0) -> None:
    """The key child of the start-up's certificate requests leaves a few seconds after them
    (``agent.identity.keys``): an idle agent has none, so its memory is read after that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _has_key_child(pid):
        time.sleep(0.2)


def _has_key_child(pid: int) -> bool:
    for child in procstat.children(pid):
        with contextlib.suppress(OSError):  # a child that just exited
            if procstat.role(child) == KEY_CHILD:
                return True
    return False


def http_keepalive(bed: Testbed, path: HttpPath, s: Settings) -> dict[str, Any]:
    """h2load ``--h1``: ``s.http_clients`` keep-alive connections for ``s.http_seconds``, after an
    unrecorded ``s.http_warmup`` run; requests/s, request-time percentiles from its per-request
    log, the agents' CPU per request, and how many requests node2's agent counted
    (``istio_requests_total{reporter="destination"}``): all of them on the declared port, none on
    the L4 one; and how many node1's agent sent to each HTTPRoute backend (its ``/routes``): all
    of the routed path's, split 90/10, none of the others'. Together they show what each path
    measured."""
    url = f"http://{path.host}:{path.port}/"
    base = ["h2load", "--h1", "-c", str(s.http_clients), "-t", "1"]
    if s.http_warmup > 0:
        warm = _h2load(bed, path, [*base, "-D", _ms(s.http_warmup), url], s.http_warmup)
        if "error" in warm:
            return {"error": f"warm-up: {warm['error']}"}
    try:
        found = _measured_http(bed, path, s, base, url)
        if "error" in found or s.http_single_requests == 0:
            return found
        return {**found, **_single_http(bed, path, s, url)}
    except (OSError, RuntimeError, h2load.H2loadOutputError) as e:
        return {"error": f"h2load {url}: {e}"}


def _single_http(bed: Testbed, path: HttpPath, s: Settings, url: str) -> dict[str, Any]:
    """``s.http_single_requests`` requests one after another on one connection: the time a
    request spends in the path when nothing queues beside it (with eight in flight, the p50 is
    mostly the wait for the other seven on two shared cores). Its ``single_*_us`` percentiles
    are what "added p50" means for one request; an error is reported as ``single_error`` and
    leaves the loaded run's numbers standing."""
    log = Path(bed.the_lab.state_dir) / "logs" / "bench-h2load-single.log"
    log.unlink(missing_ok=True)
    argv = ["h2load", "--h1", "-c", "1", "-t", "1", "-n", str(s.http_single_requests),
            f"--log-file={log}", url]  # fmt: skip
    raw = _h2load(bed, path, argv, 30.0)
    if "error" in raw:
        return {"single_error": raw["error"]}
    found = h2load.summary(raw["stdout"])
    times = h2load.latencies_us(log.read_text(encoding="ascii"))
    if found["succeeded"] != s.http_single_requests or len(times) != found["requests"]:
        return {"single_error": f"{found['succeeded']} of {s.http_single_requests} succeeded"}
    return {f"single_{k}_us": v for k, v in stats.percentiles(times, HTTP_POINTS).items()}


def _measured_http(
    bed: Testbed, path: HttpPath, s: Settings, base: list[str], url: str
) -> dict[str, Any]:
    log = Path(bed.the_lab.state_dir) / "logs" / "bench-h2load-requests.log"
    log.unlink(missing_ok=True)  # h2load appends to its log file
    counted_before, routed_before = _destination_requests(bed), _route_backends(bed)
    cpu_before = procstat.total_cpu(path.proxy_pids)
    argv = [*base, "-D", _ms(s.http_seconds), f"--log-file={log}", url]
    raw = _h2load(bed, path, argv, s.http_seconds)
    cpu = procstat.total_cpu(path.proxy_pids) - cpu_before
    if "error" in raw:
        return raw
    found = h2load.summary(raw["stdout"])
    times = h2load.latencies_us(log.read_text(encoding="ascii"))
    if not found["succeeded"] or not times:
        return {"error": f"h2load {url}: no request succeeded ({found})"}
    if len(times) != found["requests"]:
        return {
            "error": f"h2load {url}: logged {len(times)} requests, reported {found['requests']}"
        }
    counted = _destination_requests(bed) - counted_before
    deadline = time.monotonic() + 3  # a response is counted as the agent finishes writing it
    while path.declared and counted < found["succeeded"] and time.monotonic() < deadline:
        time.sleep(0.1)
        counted = _destination_requests(bed) - counted_before
    routed = {
        backend: n - routed_before.get(backend, 0)
        for backend, n in _route_backends(bed).items()
        if n != routed_before.get(backend, 0)
    }
    return {
        **found,
        **{f"{k}_us": v for k, v in stats.percentiles(times, HTTP_POINTS).items()},
        "mean_us": sum(times) / len(times),
        "proxy_cpu_s": cpu,
        "destination_counted": counted,
        "route_backends": routed,
    }


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"  # h2load takes whole units


def _h2load(bed: Testbed, path: HttpPath, argv: list[str], seconds: float) -> dict[str, Any]:
    proc = bed.popen(path.client, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        stop(proc)
        return {"error": f"h2load did not finish within {seconds + 60:.0f}s"}
    finally:
        bed.procs.remove(proc)
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        return {"error": f"h2load exited {proc.returncode}: {' | '.join(tail)}"}
    return {"stdout": out.decode(errors="replace")}


def _route_backends(bed: Testbed) -> dict[str, int]:
    """node1's agent: requests sent to each HTTPRoute backend Service so far (``/routes``)."""
    status, body = netns.http_get(
        bed.the_lab.netns("node1"), "127.0.0.1", ADMIN_PORT, "/routes", timeout=5.0
    )
    if status != 200:
        raise RuntimeError(f"node1's agent answered /routes with {status}: see its log")
    out: dict[str, int] = {}
    for route in json.loads(body)["routes"]:
        for rule in route.get("rules", []):
            for backend in rule["backends"]:
                out[backend["service"]] = out.get(backend["service"], 0) + backend["requests"]
    return out


def _destination_requests(bed: Testbed) -> float:
    """node2's agent: every ``istio_requests_total{reporter="destination"}`` series, summed."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = netns.http_get(
        bed.the_lab.netns("node2"), "127.0.0.1", METRICS_PORT, "/metrics", timeout=5.0
    )
    if status != 200:
        raise RuntimeError(f"node2's agent answered /metrics with {status}: see its log")
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "istio_requests_total" and sample.labels["reporter"] == "destination"
    )
