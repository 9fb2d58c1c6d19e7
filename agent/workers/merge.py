"""One view of many processes (sans-IO): ``/metrics``, ``/connections`` and ``/requests``.

Metrics: every process renders its own exposition (``agent.base.promtext``); ``expositions``
reads them and sums the samples that have the same name and labels. That is right for
everything a worker reports: counters and histograms add up, and its gauges (open connections,
pooled HBONE connections) are its share of the node's. Agent-wide series (certificates, state,
BPF counters, restarts) come from the main process only, since a worker never reports them, so
summing leaves them as they are. The first process's help text and type win for a name.
``_created`` samples (when a counter started, per process) are times, not amounts: the
earliest is kept.

Requests (the tap): each worker has its own ring with its own cursor. A viewer must see one
cursor, so the workers' cursors are packed into one integer (``CURSOR_BITS`` each, worker 0 in
the low bits) and unpacked when it comes back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.base.promtext import format_value

CURSOR_BITS = 48
_MASK = (1 << CURSOR_BITS) - 1

Rows = list[dict[str, object]]

_BLANK = " \t\n\r\x0b\x0c"


class _Family:
    """One family of the merged exposition: the first process's HELP (as written, escaped)
    and TYPE, and per sample (its name and labels as written) the merged value."""

    __slots__ = ("doc", "exposed", "samples", "type")

    def __init__(self, exposed: str, doc: str, typ: str) -> None:
        self.exposed = exposed
        self.doc = doc
        self.type = typ
        self.samples: dict[str, float] = {}


def _families(text: str) -> list[tuple[str, str, str, list[tuple[str, float]]]]:
    """(exposed name, HELP as written, TYPE, samples) of an exposition ``promtext`` wrote.

    A sample is kept as its name and labels exactly as written: the writer sorts the labels
    and escapes their values one way, so two processes write equal series alike and the text
    is its key, without unescaping and escaping again. A HELP text loses the blanks at its
    ends, as prometheus_client's parser (which the merge used before) dropped them."""
    out: list[tuple[str, str, str, list[tuple[str, float]]]] = []
    name, doc, typ = "", "", "untyped"
    samples: list[tuple[str, float]] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            kind, _, rest = line[2:].partition(" ")
            candidate, _, tail = rest.partition(" ")
            if candidate != name:
                if name:
                    out.append((name, doc, typ, samples))
                name, doc, typ, samples = candidate, "", "untyped", []
            if kind == "HELP":
                doc = tail.lstrip(_BLANK)
            else:
                typ = tail.strip()
        elif line.startswith("#"):
            continue
        else:
            series, _, value = line.rpartition(" ")
            samples.append((series, float(value)))
    if name:
        out.append((name, doc, typ, samples))
    return out


def expositions(texts: Sequence[bytes]) -> bytes:
    """The text exposition whose samples are the sums of ``texts``' equal samples."""
    families: dict[str, _Family] = {}
    for text in texts:
        for exposed, doc, typ, samples in _families(text.decode()):
            # One family per name as a parser names it (a counter without _total).
            key = exposed[:-6] if typ == "counter" and exposed.endswith("_total") else exposed
            family = families.get(key)
            if family is None:
                exposed = key + "_total" if typ == "counter" else key
                family = families[key] = _Family(exposed, doc, typ)
            sums = family.samples
            for series, value in samples:
                if series not in sums:
                    sums[series] = value
                elif series.partition("{")[0].endswith("_created"):  # a time: the earliest
                    sums[series] = min(sums[series], value)
                else:
                    sums[series] += value
    out: list[str] = []
    for family in families.values():
        out.append(f"# HELP {family.exposed} {family.doc}\n# TYPE {family.exposed} {family.type}\n")
        out += [f"{series} {format_value(value)}\n" for series, value in family.samples.items()]
    return "".join(out).encode()


def connections(own: Rows, workers: Mapping[int, object]) -> Rows:
    """The main process's rows and each worker's, the latter marked with ``worker``."""
    out = list(own)
    for index, rows in sorted(workers.items()):
        assert isinstance(rows, list)
        out += [{**row, "worker": index} for row in rows]
    return out


def counts(answers: Mapping[int, object]) -> dict[Any, int]:
    """The sum per key of the workers' counters (``/routes``' requests per route rule)."""
    out: dict[Any, int] = {}
    for answer in answers.values():
        assert isinstance(answer, dict)
        for key, n in answer.items():
            out[key] = out.get(key, 0) + n
    return out


def _add(into: dict[str, Any], counts: object) -> None:
    if isinstance(counts, Mapping):
        for key, n in counts.items():
            into[key] = into.get(key, 0) + n


def traffic(answers: Mapping[int, Mapping[str, Any]]) -> dict[str, object]:
    """One ``/traffic`` from the workers' (``TrafficControl.describe``): conditions and effective
    policies are the same in every worker (they follow the state), so the first worker's; per
    Service, in-flight and pending counts, counters, ejections, retry budget and split decisions
    summed, and every worker's endpoints, each marked with its ``worker`` (health is learnt per
    worker: the same endpoint may be ejected by one and not another)."""
    if not answers:
        return {"policies": {}, "effective": {}, "services": {}}
    first = answers[min(answers)]
    services: dict[str, dict[str, Any]] = {}
    for index, answer in sorted(answers.items()):
        for name, st in answer.get("services", {}).items():
            merged = services.setdefault(
                name,
                {"policy": st.get("policy"), "active": 0, "pending": 0, "endpoints": [],
                 "counters": {}, "ejections": {}, "retry_budget": {}, "split_decisions": {}},
            )  # fmt: skip
            merged["active"] += st.get("active", 0)
            merged["pending"] += st.get("pending", 0)
            merged["endpoints"] += [{**e, "worker": index} for e in st.get("endpoints", [])]
            for field in ("counters", "ejections", "retry_budget", "split_decisions"):
                _add(merged[field], st.get(field))
    return {
        "policies": first.get("policies", {}),
        "effective": first.get("effective", {}),
        "services": services,
    }


def join_cursors(cursors: Sequence[int]) -> int:
    out = 0
    for i, cursor in enumerate(cursors):
        out |= (cursor & _MASK) << (CURSOR_BITS * i)
    return out


def split_cursors(cursor: int, count: int) -> list[int]:
    return [(cursor >> (CURSOR_BITS * i)) & _MASK for i in range(count)]


def requests(
    node: str, answers: Mapping[int, Mapping[str, object]], count: int, since: Sequence[int] | None
) -> dict[str, object]:
    """One ``/requests`` answer from the workers' (``agent.admin.tap.requests_view`` shape):
    entries of all, oldest first, marked with ``worker``; ``next`` packs each worker's cursor
    (a worker that did not answer keeps the cursor it was asked with)."""
    entries: Rows = []
    cursors = list(since) if since is not None else [0] * count
    missed = 0
    ring = 0
    for index, answer in sorted(answers.items()):
        rows = answer.get("requests", [])
        assert isinstance(rows, list)
        entries += [{**row, "worker": index} for row in rows]
        nxt, lost, size = answer.get("next", 0), answer.get("missed", 0), answer.get("ring_size", 0)
        assert isinstance(nxt, int) and isinstance(lost, int) and isinstance(size, int)
        cursors[index] = nxt
        missed += lost
        ring += size
    entries.sort(key=lambda row: str(row.get("time", "")))
    return {
        "node": node,
        "requests": entries,
        "next": join_cursors(cursors),
        "missed": missed,
        "ring_size": ring,
    }
