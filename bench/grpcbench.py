"""gRPC unary calls over direct, nodemesh L4 and nodemesh HTTP/2 (``make bench``'s "grpc" section).

A lab of its own (built after the main testbed is gone, like the upgrade section), so that its
topology can declare a gRPC port with a Service and nothing in the main testbed changes:

    direct           outsider (node1, unmeshed) -> plain:50051 (node2, unmeshed)
    nodemesh L4      client (node1, meshed) -> server:50052, a port nothing declares: opaque
                     bytes over HBONE
    nodemesh gRPC    client -> server:50051, which Service ``grpc`` declares
                     ``appProtocol: grpc``: node2's agent terminates h2c, authorizes every call,
                     counts it with its ``grpc-status`` and forwards it on its own h2c connection
                     to the pod (``agent.proxy.h2proxy``)
    nodemesh gRPC    client -> the Service VIP:50051: node1's agent terminates h2c too and picks
    via VIP          an endpoint per call (``agent.proxy.h2outbound``; one endpoint here, so this
                     measures the cost of both terminations, not balancing)

The server is the lab's gRPC service (``agent.lab.grpcecho``, grpcio, the same program and
port count on every path); the load is ``h2load`` (h2c prior knowledge, the Debian
``nghttp2-client``) POSTing one gRPC-framed message to ``/nodemesh.lab.Echo/Unary`` on
``grpc_clients`` connections, one call in flight on each, for ``grpc_seconds`` after an unrecorded
``grpc_warmup`` run. Reported per path, medians over the repetitions: calls/s, p50/p90/p99 of
h2load's per-request times, both agents' CPU µs per call, and how many calls node2's agent
counted with ``grpc_response_status="0"`` (all on the declared port, none elsewhere: each path
measured what its name says). Not a pass/fail test.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.lab import grpcecho, netns
from agent.lab.handle import Lab
from bench import h2load, procstat, stats

GRPC_PORT = 50051  # declared gRPC by Service grpc
GRPC_L4_PORT = 50052  # the same server program on a port nothing declares
METRICS_PORT = 15020
POINTS = (50, 90, 99)
MESH = "{nodemesh.io/mesh: enabled}"
TOPOLOGY = f"""\
nodes:
  - name: node1
    pods:
      - {{name: client, namespace: default, serviceAccount: client, annotations: {MESH}}}
      - {{name: outsider, namespace: default, serviceAccount: outsider}}
  - name: node2
    pods:
      - {{name: server, namespace: default, serviceAccount: server, labels: {{app: server}},
         annotations: {MESH}}}
      - {{name: plain, namespace: default, serviceAccount: plain}}
services:
  - {{name: grpc, namespace: default, selector: {{app: server}},
     ports: [{{port: {GRPC_PORT}, targetPort: {GRPC_PORT}, name: grpc, appProtocol: grpc}}]}}
"""
# One gRPC message (uncompressed flag, 4-byte length, payload) of a unary request.
MESSAGE = b"ping"
BODY = b"\x00" + len(MESSAGE).to_bytes(4, "big") + MESSAGE


@dataclass(frozen=True)
class GrpcSettings:
    reps: int = 5
    seconds: float = 3.0  # h2load -D: the measured run
    warmup: float = 1.0  # an unrecorded run first (HBONE pool, h2c connections); 0: none
    clients: int = 8  # h2load -c, one call in flight on each (-m 1)
    single_calls: int = 1000  # then h2load -c 1 -n: one call at a time on one connection; 0: none


@dataclass(frozen=True)
class GrpcPath:
    key: str
    title: str
    client: str
    host: str
    port: int
    proxy_pids: tuple[int, ...]
    declared: bool


def section(s: GrpcSettings, say: Any) -> dict[str, Any]:
    """The whole section: its lab, servers, ``s.reps`` rotated repetitions; lab removed after."""
    lab = Lab.up("bg" + secrets.token_hex(3), topology=TOPOLOGY, timeout=120)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for pod, port in (("server", GRPC_PORT), ("server", GRPC_L4_PORT), ("plain", GRPC_PORT)):
            servers.append(_server(lab, pod, port))
        body = Path(lab.state_dir) / "bench-grpc-body.bin"
        body.write_bytes(BODY)
        paths = _paths(lab)
        for path in paths:
            if path.declared:
                _converge(lab, path, body)
        samples: list[dict[str, Any]] = []
        for rep in range(s.reps):
            shift = rep % len(paths)
            for path in paths[shift:] + paths[:shift]:
                sample = {"rep": rep, "path": path.key, **measure(lab, path, s, body)}
                samples.append(sample)
                say(f"[{rep + 1}/{s.reps}] grpc {path.title}: {headline(sample)}")
        return {
            "settings": s.__dict__,
            "paths": [
                {"key": p.key, "title": p.title, "address": f"{p.host}:{p.port}"} for p in paths
            ],
            "samples": samples,
        }
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        lab.down()


def _server(lab: Lab, pod: str, port: int) -> subprocess.Popen[bytes]:
    log_path = Path(lab.state_dir) / "logs" / f"bench-grpc-{pod}-{port}.log"
    with open(log_path, "ab") as log:
        proc: subprocess.Popen[bytes] = lab.popen(
            pod, sys.executable, "-m", "agent.lab.grpcecho", "serve", "--port", str(port),
            "--name", pod, stdout=log, stderr=log, cwd=str(Path(__file__).resolve().parent.parent),
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while not netns.call_in(lab.netns(pod), _accepts, port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"grpcecho on {pod}:{port} did not start: see {log_path}")
        time.sleep(0.2)
    return proc


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _paths(lab: Lab) -> list[GrpcPath]:
    server, plain = str(lab.pod("server")["ip"]), str(lab.pod("plain")["ip"])
    vip = str(next(s for s in lab.status()["services"] if s["name"] == "grpc")["clusterIP"])
    pids = Path(lab.state_dir) / "pids"
    agents = tuple(int((pids / f"agent-{n}").read_text()) for n in ("node1", "node2"))
    return [
        GrpcPath("direct", "direct (no mesh)", "outsider", plain, GRPC_PORT, (), False),
        GrpcPath("mesh_l4", "nodemesh L4 (undeclared port)", "client", server, GRPC_L4_PORT,
                 agents, False),
        GrpcPath("mesh_grpc", "nodemesh gRPC (declared port)", "client", server, GRPC_PORT,
                 agents, True),
        GrpcPath("mesh_grpc_vip", "nodemesh gRPC via the Service VIP", "client", vip, GRPC_PORT,
                 agents, True),
    ]  # fmt: skip


def _converge(lab: Lab, declared: GrpcPath, body: Path) -> None:
    """Until node2's agent counts calls on the declared port (it has the Service's state)."""
    deadline = time.monotonic() + 60
    before = counted(lab)
    while True:
        _h2load(lab, declared, ["-n", "1", "-c", "1"], body, 10.0)
        if counted(lab) > before:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("node2's agent never counted a gRPC call on the declared port")
        time.sleep(0.5)


def measure(lab: Lab, path: GrpcPath, s: GrpcSettings, body: Path) -> dict[str, Any]:
    base = ["-c", str(s.clients), "-m", "1"]
    try:
        if s.warmup > 0:
            _h2load(lab, path, [*base, "-D", _ms(s.warmup)], body, s.warmup)
        log = Path(lab.state_dir) / "logs" / "bench-grpc-requests.log"
        log.unlink(missing_ok=True)  # h2load appends to its log file
        counted_before = counted(lab)
        cpu_before = procstat.total_cpu(path.proxy_pids)
        out = _h2load(
            lab, path, [*base, "-D", _ms(s.seconds), f"--log-file={log}"], body, s.seconds
        )
        cpu = procstat.total_cpu(path.proxy_pids) - cpu_before
        found = h2load.summary(out)
        times = h2load.latencies_us(log.read_text(encoding="ascii"))
    except (OSError, RuntimeError, h2load.H2loadOutputError) as e:
        return {"error": f"h2load {path.host}:{path.port}: {e}"}
    if not found["succeeded"] or not times:
        return {"error": f"h2load {path.host}:{path.port}: no call succeeded ({found})"}
    got = counted(lab) - counted_before
    deadline = time.monotonic() + 3  # a call is counted as the agent finishes writing it
    while path.declared and got < found["succeeded"] and time.monotonic() < deadline:
        time.sleep(0.1)
        got = counted(lab) - counted_before
    return {
        **found,
        **{f"{k}_us": v for k, v in stats.percentiles(times, POINTS).items()},
        "proxy_cpu_s": cpu,
        "cpu_us_per_call": cpu * 1e6 / found["requests"] if path.proxy_pids else None,
        "destination_counted_ok": got,
        **(_single(lab, path, s, body) if s.single_calls else {}),
    }


def _single(lab: Lab, path: GrpcPath, s: GrpcSettings, body: Path) -> dict[str, Any]:
    """``s.single_calls`` calls one after another on one connection, after the loaded run: the
    time a call spends in the path with nothing queued beside it (``single_*_us``). A failure is
    ``single_error`` and leaves the loaded run's numbers standing."""
    log = Path(lab.state_dir) / "logs" / "bench-grpc-single.log"
    log.unlink(missing_ok=True)
    try:
        out = _h2load(
            lab, path, ["-c", "1", "-n", str(s.single_calls), f"--log-file={log}"], body, 30.0
        )
        found = h2load.summary(out)
        times = h2load.latencies_us(log.read_text(encoding="ascii"))
    except (OSError, RuntimeError, h2load.H2loadOutputError) as e:
        return {"single_error": str(e)}
    if found["succeeded"] != s.single_calls or len(times) != found["requests"]:
        return {"single_error": f"{found['succeeded']} of {s.single_calls} calls succeeded"}
    return {f"single_{k}_us": v for k, v in stats.percentiles(times, POINTS).items()}


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"  # h2load takes whole units


def _h2load(lab: Lab, path: GrpcPath, args: list[str], body: Path, seconds: float) -> str:
    url = f"http://{path.host}:{path.port}{grpcecho.UNARY}"
    argv = [
        "h2load", "-t", "1", *args, "-d", str(body), "-H", "content-type: application/grpc",
        "-H", "te: trailers", url,
    ]  # fmt: skip
    done = lab.exec(path.client, *argv, capture_output=True, timeout=seconds + 60)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"h2load exited {done.returncode}: {' | '.join(tail)}")
    return str(done.stdout.decode(errors="replace"))


def counted(lab: Lab) -> float:
    """node2's agent: gRPC calls it served with status OK (``istio_requests_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = netns.http_get(
        lab.netns("node2"), "127.0.0.1", METRICS_PORT, "/metrics", timeout=5.0
    )
    if status != 200:
        raise RuntimeError(f"node2's agent answered /metrics with {status}: see its log")
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "istio_requests_total"
        and sample.labels.get("reporter") == "destination"
        and sample.labels.get("request_protocol") == "grpc"
        and sample.labels.get("grpc_response_status") == "0"
    )


def headline(sample: dict[str, Any]) -> str:
    if "error" in sample:
        return "ERROR " + str(sample["error"])
    return (
        f"{sample['rps']:,.0f} calls/s, p50 {sample['p50_us']:.0f} µs, p99 "
        f"{sample['p99_us']:.0f} µs, node2's agent counted {sample['destination_counted_ok']:.0f}"
    )


def values(found: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per path: the medians over repetitions without an error."""
    out: dict[str, dict[str, float | None]] = {}
    for path in found["paths"]:
        good = [s for s in found["samples"] if s["path"] == path["key"] and "error" not in s]

        def median(field: str, good: list[dict[str, Any]] = good) -> float | None:
            return stats.median([s[field] for s in good if s.get(field) is not None])

        out[path["key"]] = {
            "rps": median("rps"),
            "p50": median("p50_us"),
            "p90": median("p90_us"),
            "p99": median("p99_us"),
            "single_p50": median("single_p50_us"),
            "single_p99": median("single_p99_us"),
            "cpu_us_per_call": median("cpu_us_per_call"),
            "calls": median("requests"),
            "counted": median("destination_counted_ok"),
        }
    return out


def markdown(found: dict[str, Any] | None) -> list[str]:
    """The report's section (nothing when the section did not run)."""
    if not found:
        return []
    if "error" in found:
        return ["", "## gRPC unary", "", f"Not measured: {found['error']}"]
    s = found["settings"]
    per = values(found)
    direct = per.get("direct", {}).get("rps")

    def fmt(value: float | None, digits: int) -> str:
        return "—" if value is None else f"{value:,.{digits}f}"

    out = [
        "",
        f"## gRPC unary (`h2load` h2c, {s['clients']} connections, one call in flight on each,"
        f" {s['seconds']:g} s per repetition, `bench/grpcbench.py`)",
        "",
        "| path | calls/s | p50 µs | p90 µs | p99 µs | agent CPU µs/call | calls/s vs direct "
        "| calls: h2load / node2's agent counted OK | one at a time: p50 / p99 µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in found["paths"]:
        v = per[path["key"]]
        ratio = stats.ratio(v["rps"], direct)
        out.append(
            f"| {path['title']} | {fmt(v['rps'], 0)} | {fmt(v['p50'], 0)} | {fmt(v['p90'], 0)}"
            f" | {fmt(v['p99'], 0)} | {fmt(v['cpu_us_per_call'], 1)}"
            f" | {'—' if ratio is None else f'{ratio:.2f}x'}"
            f" | {fmt(v['calls'], 0)} / {fmt(v['counted'], 0)}"
            f" | {fmt(v['single_p50'], 0)} / {fmt(v['single_p99'], 0)} |"
        )
    failed = [s for s in found["samples"] if "single_error" in s]
    out += [f"- {s['path']} rep {s['rep']}, one at a time: {s['single_error']}" for s in failed]
    out += [
        "",
        "The server is `agent.lab.grpcecho` (grpcio, thread pool) on every path; its cost is in"
        " every number. Agent CPU is both agents' user+system time during the measured run over"
        " the calls h2load completed. node2's agent terminates h2c on the declared port (each"
        " call authorized and counted with its `grpc-status`: the last number) and relays the L4"
        " port's bytes (nothing counted); via the VIP, node1's agent terminates h2c as well and"
        ' sends each call to an endpoint it picks. "One at a time" is a second run after it'
        f" on one connection, {s.get('single_calls', 0):,} calls each sent when the last one"
        " ended: the time a call spends in the path with nothing queued beside it.",
        *_added_lines(per),
    ]
    return out


def _added_lines(per: dict[str, dict[str, float | None]]) -> list[str]:
    """What each terminating path adds to a call over the L4 path, loaded and one at a time."""
    base = per.get("mesh_l4")
    out: list[str] = []
    for key, what in (("mesh_grpc", "declared port"), ("mesh_grpc_vip", "via the Service VIP")):
        other = per.get(key)
        if base is None or other is None:
            continue
        parts = []
        for field, label in (("p50", "p50"), ("single_p50", "one at a time p50")):
            diff = stats.added(other[field], base[field])
            if diff is not None:
                parts.append(f"{label} {diff} µs")
        if parts:
            out += ["", f"nodemesh gRPC {what} against nodemesh L4: {', '.join(parts)}."]
    return out
