"""What the same-node L4 relay costs the proxy, in-process, A/B between source trees.

    sudo .venv/bin/python -m tests.bench.proxy.bench_samenode --base /work/wt-x-base \\
        [--rounds 5] [--tests bulk1,bulk4,rr,bulk1-sys,bulk4-sys,rr-sys]

Node1's outbound proxy (``tests.integration.proxy.mesh``, loopback) relays a client pod's
connections to a pod on its own node (the direct local path: ``relay.start_sockets``); a helper
process stands for both pods (``bench_windows.HELPER``: sink and echo apps on the local pod's IP,
clients from the client pod's IP), so the child's process CPU is the proxy's alone. Per test, a
fresh child process per variant, variants alternated round by round (the machine is shared: take
the minimum):

  - ``bulk1``/``bulk4``: 1 GiB through 1 or 4 connections: proxy CPU s/GB (and Gbit/s, noise);
  - ``rr``: 3,000 sequential 1 KB round trips on one connection: proxy CPU µs per round trip;
  - ``*-sys``: the same with ``perf stat`` attached (a separate run: perf's cost is not in the
    CPU figures): system calls by name per MiB (bulk, 256 MiB) or per round trip.

Variants: ``base`` (the tree given by ``--base``, e.g. a detached worktree of main), ``this``
(this tree), ``always`` (this tree with ``relay.SPLICE_AFTER`` = 1: every read after the first
is a splice), ``this@N`` (``SPLICE_AFTER`` = N). Numbers in docs/performance/workers-and-splice.md
("Splicing socket-to-socket relays").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import uvloop

from tests.bench.proxy.bench_rr_counts import perf_result, perf_syscalls
from tests.bench.proxy.bench_windows import Bench, cpu
from tests.integration.proxy.mesh import LOCAL, Mesh

MIB = 1024 * 1024
THIS = Path(__file__).resolve().parents[3]


class Pods(Bench):
    """Both pods on node1: the apps on the local pod (the direct local path)."""

    nodelay = True

    def __init__(self, mesh: Mesh) -> None:
        super().__init__(mesh, LOCAL)


async def bulk(pods: Pods, streams: int, total: int, count: bool) -> dict[str, Any]:
    port = await pods.entry("sink")
    await pods.run(["rr", await pods.entry("echo"), 20])
    await pods.run(*[["send", port, 16 * MIB] for _ in range(streams)])  # warm the path
    jobs = [["send", port, total // streams] for _ in range(streams)]
    if count:
        perf = perf_syscalls(os.getpid())
        await asyncio.sleep(1.0)  # perf attaches
        res = await pods.run(*jobs)
        return {"syscalls_per_mib": perf_result(perf, sum(res["out"]) // MIB)}
    before = cpu()
    res = await pods.run(*jobs)
    used = cpu() - before
    gb = sum(res["out"]) / 1e9
    return {"cpu_s_per_gb": used / gb, "gbps": gb * 8 / res["wall"]}


async def rr(pods: Pods, n: int, count: bool) -> dict[str, Any]:
    port = await pods.entry("echo")
    await pods.run(["rr", port, 200])
    if count:
        perf = perf_syscalls(os.getpid())
        await asyncio.sleep(1.0)
        await pods.run(["rr", port, n])
        return {"syscalls_per_rr": perf_result(perf, n)}
    before = cpu()
    res = await pods.run(["rr", port, n])
    used = cpu() - before
    times = sorted(res["out"][0])
    return {"cpu_us_per_rr": used / n * 1e6, "p50_us": times[n // 2]}


TESTS = {
    "bulk1": lambda p: bulk(p, 1, 1024 * MIB, False),
    "bulk4": lambda p: bulk(p, 4, 1024 * MIB, False),
    "rr": lambda p: rr(p, 3000, False),
    "bulk1-sys": lambda p: bulk(p, 1, 256 * MIB, True),
    "bulk4-sys": lambda p: bulk(p, 4, 256 * MIB, True),
    "rr-sys": lambda p: rr(p, 3000, True),
}


def child(test: str, splice_after: int) -> dict[str, Any]:
    from agent.proxy import relay

    if splice_after:
        setattr(relay, "SPLICE_AFTER", splice_after)  # noqa: B010 (absent from a base tree)

    async def main() -> dict[str, Any]:
        mesh = Mesh()
        await mesh.start()
        pods = Pods(mesh)
        try:
            result: dict[str, Any] = await asyncio.wait_for(TESTS[test](pods), 300)
            return result | {"relay": relay.__file__}
        finally:
            pods.close()
            await mesh.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def run_child(tree: Path, test: str, splice_after: int) -> dict[str, Any]:
    argv = [sys.executable, str(THIS / "tests/bench/proxy/bench_samenode.py")]
    argv += ["--child", test, str(splice_after)]
    env = os.environ | {"PYTHONPATH": str(tree)}
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=tree, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["relay"].startswith(str(tree)), (result["relay"], tree)
    return result


def summary(results: dict[tuple[str, str], list[dict[str, Any]]], rounds: int) -> None:
    print(f"\nmin / median over {rounds} rounds")
    for (test, variant), runs in results.items():
        cells = []
        for key, value in runs[0].items():
            if isinstance(value, float):
                values = [r[key] for r in runs]
                cells.append(f"{key} {min(values):.3f} / {statistics.median(values):.3f}")
            elif isinstance(value, dict):
                names = dict.fromkeys(n for r in runs for n in r[key])
                total = [sum(r[key].values()) for r in runs]
                cells.append(f"{key} total {min(total):.2f} / {statistics.median(total):.2f}")
                for name in list(names)[:6]:
                    values = [r[key].get(name, 0.0) for r in runs]
                    cells.append(f"{name} {statistics.median(values):.2f}")
        print(f"{test:10} {variant:7} " + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="the tree to compare against (main's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tests", default=",".join(TESTS))
    parser.add_argument("--variants", default="base,this,always")
    parser.add_argument(
        "--child", nargs=2, metavar=("TEST", "SPLICE_AFTER"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    trees = {"base": (args.base, 0), "this": (THIS, 0), "always": (THIS, 1)}
    variants = args.variants.split(",")
    for variant in variants:  # "this@N": this tree with ``SPLICE_AFTER`` = N
        if variant.startswith("this@"):
            trees[variant] = (THIS, int(variant.removeprefix("this@")))
    if "base" in variants and args.base is None:
        parser.error("--base: a tree of main to compare against (or --variants this,always)")
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for test in args.tests.split(","):
            for variant in variants if rnd % 2 == 0 else variants[::-1]:
                tree, splice_after = trees[variant]
                res = run_child(tree.resolve(), test, splice_after)
                res.pop("relay")
                results.setdefault((test, variant), []).append(res)
                print(f"round {rnd} {test:10} {variant:7} {json.dumps(res)}", flush=True)
    summary(results, args.rounds)


if __name__ == "__main__":
    main()
