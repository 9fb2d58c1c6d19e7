"""``python -m bench`` (``make bench``; ``make bench QUICK=1`` for the quick mode).

Runs the whole benchmark (root needed: it builds a lab) and writes
``bench/results/<UTC timestamp>[-quick]/{results.json,summary.md,chart.png}``; a full run (not
``--quick``) also updates the committed ``bench/RESULTS.md`` and ``bench/RESULTS.png`` unless
``--no-publish``. ``--out DIR`` writes the three files to DIR instead.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import shutil
import signal
import sys
from pathlib import Path

from bench import report, runner, settings

BENCH_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    settings.add_arguments(parser)
    parser.add_argument("--out", type=Path, help="results directory (default: under results/)")
    parser.add_argument("--lab", help="name of the lab to build (default: bn<random>)")
    parser.add_argument(
        "--no-publish", action="store_true", help="a full run leaves RESULTS.md/.png unchanged"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: builds a lab of network namespaces; run as root (sudo make bench)")
    chosen = settings.from_arguments(args)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or BENCH_DIR / "results" / (stamp + ("-quick" if chosen.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the lab and every started process are removed.
    signal.signal(signal.SIGTERM, functools.partial(_terminate, os.getpid()))
    results = runner.run(chosen, lab=args.lab)
    results["json_name"] = "results.json"
    report.write_json(results, out / "results.json")
    report.chart(results, out / "chart.png")
    (out / "summary.md").write_text(report.markdown(results, "chart.png"), encoding="utf-8")
    runner.say(f"results in {out}/ (results.json, summary.md, chart.png)")
    if not chosen.quick and not args.no_publish:
        shutil.copyfile(out / "chart.png", BENCH_DIR / "RESULTS.png")
        published = dict(
            results, json_name=f"bench/results/{out.name}/results.json (not committed)"
        )
        (BENCH_DIR / "RESULTS.md").write_text(
            report.markdown(published, "RESULTS.png"), encoding="utf-8"
        )
        runner.say("updated bench/RESULTS.md and bench/RESULTS.png")
    sys.stdout.write(report.markdown(results, None))


def _terminate(main_pid: int, signum: int, _frame: object) -> None:
    """Exit through the context managers, in this process only: a forked helper (pyroute2 forks
    one to create each network namespace, then terminates it) dies the default way."""
    if os.getpid() != main_pid:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(f"bench: stopped by signal {signum}")
