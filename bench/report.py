"""The results written three ways: every sample as JSON, medians and ratios as Markdown, a chart.

The Markdown is what ``bench/RESULTS.md`` holds: settings, machine, load, how each path was
verified (an unverified path's column is marked *untrusted*), the table of medians with ratios
against direct and against stunnel4, the idle-memory steps, the cipher ceiling and any failures.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import grpcbench, scaling, stats, summary
from bench.settings import SECTIONS

# What capped a path's idle steps in results written before the agent had connection caps.
_BY_FILES = "the proxy's open-files limit"


def write_json(results: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def markdown(results: Mapping[str, Any], chart: str | None) -> str:
    settings = results["settings"]
    paths = {p["key"]: p for p in results["paths"]}
    values = summary.path_values(results)
    ratios = summary.ratios(values)
    order = [k for k in summary.PATH_ORDER if k in paths]
    titles = [
        paths[k]["title"] + ("" if paths[k]["verification"]["ok"] else " (untrusted)")
        for k in order
    ]
    out = [
        "# nodemesh benchmarks" + (" (quick mode: indicative only)" if settings["quick"] else ""),
        "",
        f"Run {results['started']} → {results['finished']} with `python -m bench"
        f"{' --quick' if settings['quick'] else ''}` (`make bench`). Medians over "
        f"{settings['reps']} interleaved repetition(s); every sample is in "
        f"`{results['json_name']}`.",
    ]
    sections = settings.get("sections", ",".join(SECTIONS)).split(",")
    if "tcp" in sections or "idle" in sections:
        out += [
            "",
            "| metric | unit | " + " | ".join(titles) + " | " + " | ".join(ratios) + " |",
            "|---|---|" + "---:|" * (len(order) + len(ratios)),
        ]
        for m in summary.metrics(settings["streams"]):
            cells = [_fmt(values[k][m.key], m.digits) for k in order]
            cells += [_ratio(r[m.key]) for r in ratios.values()]
            out.append(f"| {m.title} | {m.unit} | " + " | ".join(cells) + " |")
        out += [
            "",
            "Ratios are path / reference of the medians: above 1x is more (throughput, rate) or"
            " slower / costlier (latency, CPU, memory). Proxy CPU and memory are the agents' (both"
            " nodes on the cross-node path, node1's on the same-node path) or both stunnel"
            " processes'.",
        ]
    else:
        out += ["", f"Sections run: {', '.join(sections)} (`--sections`)."]
    out += _http_section(results)
    if chart:
        out += ["", f"![benchmark chart]({chart})"]
    out += ["", "## Path verification", ""]
    for k in order:
        v = paths[k]["verification"]
        out.append(f"- **{paths[k]['title']}** ({'verified' if v['ok'] else 'UNTRUSTED'}): "
                   + "; ".join(v["checks"]))  # fmt: skip
    out += _agents_section(results)
    out += _idle_section(results, paths)
    out += scaling.markdown(results.get("scaling"))
    out += _upgrade_section(results)
    out += grpcbench.markdown(results.get("grpc"))
    out += _speed_section(results)
    out += _machine_section(results)
    problems = summary.errors(results)
    if problems:
        out += ["", "## Failures", "", *(f"- {p}" for p in problems)]
    return "\n".join(out) + "\n"


def _http_section(results: Mapping[str, Any]) -> list[str]:
    paths = results.get("http_paths", [])
    if not paths:
        return []
    values = summary.http_values(results)
    direct = values.get("direct", {}).get("rps")
    s = results["settings"]
    out = [
        "",
        f"## HTTP/1.1 keep-alive (`h2load --h1`, {s['http_clients']} connections, "
        f"{s['http_seconds']:g} s per repetition)",
        "",
        "| path | req/s | p50 µs | p90 µs | p99 µs | agent CPU µs/request | req/s vs direct "
        "| requests: h2load / node2's agent counted | one at a time: p50 / p99 µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        v = values[path["key"]]
        out.append(
            f"| {path['title']} | {_fmt(v['rps'], 0)} | {_fmt(v['p50'], 0)} | {_fmt(v['p90'], 0)}"
            f" | {_fmt(v['p99'], 0)} | {_fmt(v['cpu_us_per_request'], 1)}"
            f" | {_ratio(stats.ratio(v['rps'], direct))}"
            f" | {_fmt(v['requests'], 0)} / {_fmt(v['counted'], 0)}"
            f" | {_fmt(v['single_p50'], 0)} / {_fmt(v['single_p99'], 0)} |"
        )
    out += _http_vs_l4(values)
    out += [
        "",
        "Request times are h2load's per-request log (request start to the end of its response),"
        " one request in flight per connection; the measured run opens its connections after an"
        " unrecorded warm-up run. Agent CPU is both agents' user+system time during the measured"
        " run over the requests h2load completed. node2's agent parses, authorizes and counts"
        " the declared port's requests (the growth of its"
        ' `istio_requests_total{reporter="destination"}` is the last number) and relays the L4'
        ' port\'s as bytes (no growth). "One at a time" is a second run after it on one'
        f" connection, {s.get('http_single_requests', 0):,} requests each sent when the last"
        " one's response ended: the time a request spends in the path with nothing queued"
        " beside it (under the loaded run's eight, the p50 is mostly waiting for the others).",
    ]
    return out


def _http_vs_l4(values: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """The goal of the HTTP path, measured: requests/s against the L4 path's (at least half),
    its p50 over the L4 path's (at most 150 µs more: loaded, and one request at a time, which
    is the latency the proxies add to a request) and the agents' CPU per request; and what
    routing costs: the HTTPRoute path (match, split, retry) against plain HTTP via a Service."""
    out = []
    for base_key, key, what in (
        ("mesh_l4", "mesh_http", "nodemesh HTTP against nodemesh L4 (pod port)"),
        ("svc_l4", "svc_http", "nodemesh HTTP against nodemesh L4 via a Service"),
        ("svc_http", "svc_routed", "nodemesh HTTP routed (HTTPRoute) against plain via a Service"),
    ):
        base, other = values.get(base_key), values.get(key)
        if base is None or other is None:
            continue
        cpu = stats.ratio(other["cpu_us_per_request"], base["cpu_us_per_request"])
        out += [
            "",
            f"{what}: req/s {_ratio(stats.ratio(other['rps'], base['rps']))}, p50"
            f" {_added(base['p50'], other['p50'])} µs (one at a time:"
            f" {_added(base['single_p50'], other['single_p50'])} µs), agent CPU per request"
            f" {_ratio(cpu)}.",
        ]
    return out


def _added(base: float | None, other: float | None) -> str:
    """``other - base`` signed (``+12``, ``-3``), or a dash when either is missing."""
    return stats.added(other, base) or "—"


def _agents_section(results: Mapping[str, Any]) -> list[str]:
    found = results.get("agents", [])
    if not found:
        return []
    out = ["", "## Idle agents: RSS per process, no connections", ""]
    for agent in found:
        where = f"{agent['node']}'s agent ({agent['moment']})"
        if "error" in agent:
            out.append(f"- {where}: ERROR {agent['error']}")
            continue
        out.append(
            f"- {where}: {agent['rss_bytes'] / 2**20:,.1f} MiB, programs {agent['programs']}"
            " at start-up"
        )
        for proc in agent.get("processes", []):
            out.append(
                f"  - {proc['role']} (pid {proc['pid']}): RSS {proc['rss_bytes'] / 2**20:,.1f}"
                f" MiB, PSS {proc['pss_bytes'] / 2**20:,.1f} MiB, anonymous"
                f" {proc['anon_bytes'] / 2**20:,.1f} MiB"
            )
    return out


def _idle_section(results: Mapping[str, Any], paths: Mapping[str, Any]) -> list[str]:
    if not results.get("idle"):
        return []
    out = ["", "## Idle connections: proxy RSS", ""]
    for key, idle in results.get("idle", {}).items():
        steps = ", ".join(
            f"{st['open']:,} → {st['rss_bytes'] / 2**20:,.1f} MiB" for st in idle["steps"]
        )
        per = idle.get("bytes_per_connection")
        slope = "—" if per is None else f"{per / 1024:,.1f} KiB per connection"
        cap = ""
        if "capped_at" in idle:
            cap = (
                f"; capped at {idle['capped_at']:,} by {idle.get('capped_by', _BY_FILES)}"
                f" (open-files limit {idle['open_files_limit']:,})"
            )
        out.append(f"- {paths[key]['title']}: {steps} (slope {slope}{cap})")
    return out


def _upgrade_section(results: Mapping[str, Any]) -> list[str]:
    found = results.get("upgrade")
    if not found or "error" in found:
        return []
    out = [
        "",
        "## Agent upgrades under load (`nodemesh lab upgrade`, `bench/upgrade.py`)",
        "",
        "| phase | takeover s | live streams | resets | new conns ok | failed | escapes "
        "| probes down | longest stall ms | slowest new ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ph in found["phases"].items():
        takeover = ph["upgrade"]["takeover_seconds"] if ph["upgrade"] else None
        out.append(
            f"| {name} | {_fmt(takeover, 2)} | {ph['long_lived']} | {ph['resets']} "
            f"| {ph['new_ok']} | {ph['new_failed']} | {ph['escapes']} "
            f"| {sum(ph['probes']['down'].values())} | {ph['longest_stall_ms']:.1f} "
            f"| {ph['slowest_new_ms']:.1f} |"
        )
    out += [
        "",
        "Each phase: the streams (HBONE both ways between the nodes, same-node, plaintext into the"
        " mesh) and new connections run, the node's agent is upgraded (none in the baseline),"
        " then they stop. Escapes: the meshed clients' marker in clear on the node link, segments"
        " between a meshed client and a server port on the link, and meshed-flow segments the"
        " datapath passed uncaptured. Probes: readiness, metrics and admin of the node, every"
        " 0.1 s. Stall: the longest send-to-echo time of any chunk of any live stream.",
    ]
    return out


def _speed_section(results: Mapping[str, Any]) -> list[str]:
    if not results.get("openssl_speed"):
        return []
    out = ["", "## Cipher ceiling (`openssl speed -evp`, one core, 16 KiB blocks)", ""]
    for entry in results.get("openssl_speed", []):
        rate = entry.get("bytes_per_second")
        shown = f"{rate * 8 / 1e9:.2f} Gbit/s" if rate else entry.get("error", "—")
        out.append(f"- {entry['cipher']} ({', '.join(entry['negotiated_by'])}): {shown}")
    return out


def _machine_section(results: Mapping[str, Any]) -> list[str]:
    m, load, s = results["machine"], results["load"], results["settings"]
    return [
        "",
        "## Machine and settings",
        "",
        f"- {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}, kernel {m['kernel']};"
        f" Python {m['python']}; {m['openssl']}; {m['iperf3']}; {m['stunnel']}",
        f"- load average (1/5/15 min) before: {load['before']}, after: {load['after']}"
        f"{_load_during(results)} (the machine is shared with other engineers' tests: ratios"
        " within one run are what to compare, not absolute numbers across runs)",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in s.items()),
        *_code_line(results),
    ]


def _code_line(results: Mapping[str, Any]) -> list[str]:
    code = results.get("code")
    if code is None:
        return []
    dirty = code["dirty"]
    changes = f" plus uncommitted changes to {', '.join(dirty)}" if dirty else ""
    return [f"- code measured: commit {code['commit']}{changes}"]


def _load_during(results: Mapping[str, Any]) -> str:
    loads = sorted(s["load1"] for s in results["samples"] if "load1" in s)
    if not loads:
        return ""
    return (
        f"; 1-minute load after each sample: min {loads[0]}, median {loads[len(loads) // 2]},"
        f" max {loads[-1]}"
    )


def chart(results: Mapping[str, Any], path: Path) -> None:
    """Four panels: throughput, latency percentiles, connection rate, idle memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = summary.path_values(results)
    paths = {p["key"]: p["title"] for p in results["paths"]}
    order = [k for k in summary.PATH_ORDER if k in paths]
    streams = results["settings"]["streams"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _bars(axes[0][0], order, paths, values, ["bulk_1", f"bulk_{streams}"],
          ["1 stream", f"{streams} streams"], "throughput (Gbit/s)")  # fmt: skip
    _bars(axes[0][1], order, paths, values, ["rr_p50", "rr_p99", "rr_p99.9"],
          ["p50", "p99", "p99.9"], "1 KB request/response (µs)")  # fmt: skip
    _bars(axes[1][0], order, paths, values, ["conn_rate"], ["conn/s"], "new connections per second")
    ax = axes[1][1]
    for key, idle in results.get("idle", {}).items():
        steps = idle["steps"]
        ax.plot([s["open"] for s in steps], [s["rss_bytes"] / 2**20 for s in steps],
                marker="o", label=paths[key])  # fmt: skip
    ax.set_xlabel("idle connections")
    ax.set_ylabel("proxy RSS (MiB)")
    ax.set_title("memory of idle connections")
    ax.legend(fontsize=8)
    fig.suptitle("nodemesh vs direct vs stunnel4 (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _bars(
    ax: Any, order: list[str], titles: Mapping[str, str],
    values: Mapping[str, Mapping[str, float | None]],
    keys: list[str], labels: list[str], title: str,
) -> None:  # fmt: skip
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(zip(keys, labels, strict=True)):
        heights = [values[p][key] or 0.0 for p in order]
        ax.bar([x + i * width for x in range(len(order))], heights, width, label=label)
    ax.set_xticks([x + width * (len(keys) - 1) / 2 for x in range(len(order))])
    ax.set_xticklabels([titles[p].replace(" ", "\n", 1) for p in order], fontsize=8)
    ax.set_title(title)
    if len(keys) > 1:
        ax.legend(fontsize=8)
