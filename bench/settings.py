"""How long and how often each workload runs: the full run, the quick run, command-line overrides.

The full preset is sized so that the whole ``make bench`` (lab set-up included) stays within 15
minutes on 2 cores and every reported median has three repetitions behind it; the quick preset
(``make bench QUICK=1``) checks that everything works in under two minutes and its numbers are
only indicative. Every field can be overridden on the command line.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# The parts of a run, in the order they run: idle memory, the TCP workloads over every path (and
# the cipher ceiling of the TLS paths they negotiated), the HTTP/1.1 workload, agent upgrades.
SECTIONS = ("idle", "tcp", "http", "upgrade", "grpc", "scaling")


@dataclass(frozen=True)
class Settings:
    reps: int = 5  # interleaved repetitions of every (path, workload)
    bulk_seconds: int = 4  # iperf3 -t (whole seconds: iperf3 reads 0.5 as 0, which is forever)
    bulk_omit: int = 1  # iperf3 -O: warm-up seconds not counted
    streams: int = 4  # parallel iperf3 streams for the multi-stream workload
    rr_count: int = 5000  # recorded round trips per repetition (x reps for the percentiles)
    rr_warmup: int = 500  # round trips not recorded
    rr_size: int = 1024
    conn_seconds: float = 4.0
    conn_warmup: float = 1.0
    conn_concurrency: int = 8
    conn_size: int = 100
    http_seconds: float = 3.0  # h2load -D: the measured HTTP/1.1 keep-alive run
    http_warmup: float = 1.0  # an unrecorded h2load run first (HBONE pool, caches); 0: none
    http_clients: int = 8  # h2load -c: keep-alive connections, one request in flight on each
    # h2load -c 1 -n: requests one at a time on one connection after the loaded run, for the
    # latency a request gains through the proxies without queueing behind the others; 0: none
    http_single_requests: int = 1000
    idle_steps: tuple[int, ...] = (1000, 2500, 5000, 10000)
    speed_seconds: int = 3  # openssl speed -seconds
    marker_bytes: int = 65536
    upgrade_long_lived: int = 100  # live streams held across each agent upgrade
    upgrade_new_per_second: float = 4.0  # new connections per second, per flow (4 flows)
    upgrade_settle_seconds: float = 4.0  # load before and after each upgrade
    sections: str = ",".join(SECTIONS)  # which parts run: a comma-separated subset of SECTIONS
    grpc_seconds: float = 3.0  # h2load -D: the measured gRPC unary run (bench.grpcbench)
    grpc_warmup: float = 1.0  # an unrecorded run first; 0: none
    grpc_clients: int = 8  # h2load -c: h2c connections, one call in flight on each
    grpc_single_calls: int = 500  # h2load -c 1 -n: calls one at a time, as http_single_requests
    # Extra flags for both agents (e.g. "--splice"): each is restarted with them once the lab
    # is up, before anything is measured.
    agent_args: str = ""
    quick: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def runs(self, section: str) -> bool:
        return section in self.sections.split(",")


FULL = Settings()
QUICK = Settings(
    reps=1,
    bulk_seconds=2,
    bulk_omit=0,
    rr_count=2000,
    rr_warmup=200,
    conn_seconds=1.5,
    conn_warmup=0.5,
    http_seconds=1.5,
    http_warmup=0.5,
    idle_steps=(200, 1000),
    speed_seconds=1,
    upgrade_long_lived=40,
    upgrade_new_per_second=2.0,
    upgrade_settle_seconds=2.0,
    grpc_seconds=1.5,
    grpc_warmup=0.5,
    http_single_requests=300,
    grpc_single_calls=300,
    quick=True,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the quick preset (< 2 minutes)")
    for f in fields(Settings):
        if f.name == "quick":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "idle_steps":
            parser.add_argument(flag, type=_steps, help="comma-separated counts, e.g. 1000,10000")
        else:
            parser.add_argument(flag, type=type(f.default), help=f"default {f.default} (full)")


def from_arguments(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    changes = {
        f.name: getattr(args, f.name)
        for f in fields(Settings)
        if f.name != "quick" and getattr(args, f.name, None) is not None
    }
    settings = replace(base, **changes)
    if min(settings.reps, settings.rr_count, settings.bulk_seconds) < 1:
        raise SystemExit("bench: --reps, --rr-count and --bulk-seconds must be at least 1")
    if settings.http_seconds < 0.001 or settings.http_clients < 1 or settings.http_warmup < 0:
        raise SystemExit(
            "bench: --http-seconds must be at least 0.001, --http-clients at least 1 and "
            "--http-warmup not negative"
        )
    if settings.http_single_requests < 0 or settings.grpc_single_calls < 0:
        raise SystemExit("bench: --http-single-requests and --grpc-single-calls take 0 or more")
    unknown = set(settings.sections.split(",")) - set(SECTIONS)
    if unknown:
        raise SystemExit(
            f"bench: --sections takes a comma-separated subset of {','.join(SECTIONS)}, "
            f"not {','.join(sorted(unknown))}"
        )
    if settings.grpc_seconds < 0.001 or settings.grpc_clients < 1 or settings.grpc_warmup < 0:
        raise SystemExit(
            "bench: --grpc-seconds must be at least 0.001, --grpc-clients at least 1 and "
            "--grpc-warmup not negative"
        )
    return settings


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--idle-steps wants counts like 1000,10000: {e}") from e
    if not steps or steps[0] < 1:
        raise argparse.ArgumentTypeError("--idle-steps wants positive counts like 1000,10000")
    return steps
