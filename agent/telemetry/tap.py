"""Recent HTTP requests for ``nodemesh requests`` (a live tap, like ``linkerd viz tap``), sans-IO.

Why a ring of finished requests and cursors, not a queue per viewer: the data path must never
wait for a viewer, and its memory must not grow with the number of viewers or their speed. Each
finished request is appended to one fixed-size ring (``RequestRing.add``: a deque append and a
counter, nothing else on the request path) and numbered; a viewer asks for what came after the
last number it saw (its cursor). A viewer that falls more than ``size`` requests behind loses
the oldest ones: the answer says how many (``missed``), and the ring counts them over all
viewers (``missed_total``, exported as ``nodemesh_tap_missed_requests_total``).

Entries are kept as the records the proxy reported and turned into the access log's fields
(``agent.telemetry.accesslog.request_entry``) only when a viewer reads them, so a ring nobody
reads costs no JSON. What a record holds of the request (method, path, authority, request id,
trace headers) is the client's, up to the head limit (60 KiB on HTTP/1.1): 2,048 such records
held 120 MiB that any client could fill. A record whose fields add up to more than
``MAX_HELD_CHARS`` is kept trimmed instead (each field cut to ``MAX_FIELD_CHARS``, marked with
how much was cut; trace headers, which no entry shows, dropped), so the ring holds at most
about 4 KiB of them per entry; the access log line has the whole record.

Waiting (long-poll) is the admin API's business (``agent.admin.tap``): ``add`` calls the
one-shot wake-ups registered with ``on_next`` and forgets them.

``RequestFilter`` selects entries by workload (either side, or one side), the Service dialled
(``destination_service``: Linkerd's ``tap svc/web``), method, path prefix,
status (exact ``404`` or a class ``5xx``), gRPC status (a code, its name, or ``error``: a
failed gRPC call is mostly answered HTTP 200, so ``5xx`` does not find it) and policy (the one
that refused a request or a dry-run one that would have: ``policy``, ``dry_run_policy``); the
admin API
applies it to what it serves and the CLI builds its query from the same class, so both sides
agree on what a filter means.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

from agent.telemetry.accesslog import request_entry
from agent.telemetry.records import ConnectionRecord, RequestRecord

DEFAULT_SIZE = 2048
MAX_HELD_CHARS = 4096  # a record's client-given text (method, path, authority, id, trace) kept
MAX_FIELD_CHARS = 1024  # beyond ``MAX_HELD_CHARS``, each field is kept up to this


def _cut(text: str) -> str:
    if len(text) <= MAX_FIELD_CHARS:
        return text
    return f"{text[:MAX_FIELD_CHARS]}...({len(text) - MAX_FIELD_CHARS} more)"


def trimmed(request: RequestRecord) -> RequestRecord:
    """``request`` with its client-given fields cut to ``MAX_FIELD_CHARS`` and no trace
    headers: what the ring keeps of a request whose fields are longer than it holds."""
    return replace(
        request,
        method=_cut(request.method),
        path=_cut(request.path),
        authority=_cut(request.authority),
        request_id=_cut(request.request_id),
        trace_headers=(),
    )


class Tapped(NamedTuple):
    seq: int
    ended: float  # time.time() when it was reported
    connection: ConnectionRecord
    request: RequestRecord
    labels: Mapping[str, str]  # its metric labels (``REQUEST_LABEL_NAMES``)


_new_tapped = tuple.__new__


class Batch(NamedTuple):
    entries: list[dict[str, object]]  # access log fields, oldest first
    next: int  # the cursor to ask with next time
    missed: int  # requests after the cursor that the ring no longer held


class RequestRing:
    """The last ``size`` requests, numbered from 0 in the order they were reported."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError(f"a request ring needs room for at least 1 request, not {size}")
        self.size = size
        self._entries: deque[Tapped] = deque(maxlen=size)
        self._next = 0
        self._wake: list[Callable[[], None]] = []
        self.missed_total = 0

    @property
    def cursor(self) -> int:
        """The number the next request will get (ask ``since(cursor)`` for what comes next)."""
        return self._next

    def add(
        self,
        connection: ConnectionRecord,
        request: RequestRecord,
        labels: Mapping[str, str],
        ended: float | None = None,
    ) -> None:
        """Keep the request, reported at ``ended`` (``time.time()``; None: now). The entry is
        made as ``tuple.__new__`` makes it, without ``Tapped``'s own ``__new__`` (a Python
        call per request); a request longer than the ring holds is kept ``trimmed`` (its
        length summed here, inline for the same reason)."""
        held = len(request.method) + len(request.path) + len(request.authority)
        held += len(request.request_id)
        for _, value in request.trace_headers:
            held += len(value)
        if held > MAX_HELD_CHARS:
            request = trimmed(request)
        self._entries.append(
            _new_tapped(
                Tapped,
                (self._next, time.time() if ended is None else ended, connection, request, labels),
            )
        )
        self._next += 1
        if self._wake:
            wake, self._wake = self._wake, []
            for call in wake:
                call()

    def on_next(self, call: Callable[[], None]) -> None:
        """Call ``call()`` once, when the next request is added."""
        self._wake.append(call)

    def forget(self, call: Callable[[], None]) -> None:
        """Withdraw a wake-up that was not called (its waiter gave up)."""
        if call in self._wake:
            self._wake.remove(call)

    def since(
        self, cursor: int | None, selected: RequestFilter | None = None, limit: int = 500
    ) -> Batch:
        """Entries numbered ``cursor`` and later that ``selected`` matches, at most ``limit``
        (the oldest first); ``cursor`` None: the latest ``limit`` matching entries held."""
        first = self._entries[0].seq if self._entries else self._next
        missed = 0
        if cursor is None:
            start = first
        else:
            start = min(max(cursor, 0), self._next)
            if start < first:
                missed = first - start
                self.missed_total += missed
                start = first
        out: list[dict[str, object]] = []
        nxt = start
        for item in list(self._entries)[start - first :]:
            entry = request_entry(item.connection, item.request, item.labels, item.ended)
            nxt = item.seq + 1
            if selected is None or selected.matches(entry):
                out.append(entry)
                if cursor is not None and len(out) == limit:
                    break
        if cursor is None:
            out = out[-limit:]
        return Batch(out, nxt, missed)


class FilterError(ValueError):
    """A filter value that cannot select anything; the message says what is expected."""


def parse_status(text: str) -> tuple[int, int]:
    """``404`` → (404, 405); ``5xx`` → (500, 600): the range of status codes selected."""
    value = text.strip().lower()
    if len(value) == 3 and value[0] in "12345" and value[1:] == "xx":
        low = int(value[0]) * 100
        return low, low + 100
    if len(value) == 3 and value.isdigit() and 100 <= int(value) <= 599:
        return int(value), int(value) + 1
    hint = ""
    if value.upper() in GRPC_STATUS_NAMES or value == GRPC_ERROR:
        hint = " (a gRPC status is filtered apart: grpc_status, nodemesh requests --grpc-status)"
    raise FilterError(
        f"status {text!r}: expected a status code such as 404 or a class such as 5xx{hint}"
    )


# gRPC status codes by number (grpc/doc/statuscodes.md).
GRPC_STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
GRPC_ERROR = "error"  # any gRPC status but OK


def parse_grpc_status(text: str) -> str:
    """``5`` or ``not_found`` → ``"5"`` (as the access log writes it); ``error`` stays."""
    value = text.strip()
    if value.lower() == GRPC_ERROR:
        return GRPC_ERROR
    if value.upper() in GRPC_STATUS_NAMES:
        return str(GRPC_STATUS_NAMES.index(value.upper()))
    if value.isdigit() and int(value) < len(GRPC_STATUS_NAMES):
        return str(int(value))
    raise FilterError(
        f"grpc status {text!r}: expected a code 0-16, its name such as NOT_FOUND, "
        "or error (any status but OK)"
    )


def _workload_matches(wanted: str, name: object, namespace: object) -> bool:
    """``name`` matches a workload of that name in any namespace, ``ns/name`` only there."""
    ns, sep, bare = wanted.rpartition("/")
    return name == bare and (not sep or namespace == ns)


def _names_policy(wanted: str, ref: str) -> bool:
    """``name`` or ``ns/name`` names any rule of that policy (``ns/name:rules[1]`` in a
    record), ``ns/name:rules[1]`` that rule only; ``no-allow-match`` names itself."""
    if ":" in wanted:
        return ref == wanted
    ns, sep, bare = wanted.rpartition("/")
    ref_ns, _, ref_name = ref.partition(":")[0].rpartition("/")
    return ref_name == bare and (not sep or ref_ns == ns)


def _policy_matches(wanted: str, entry: Mapping[str, object]) -> bool:
    """The policy that refused the request, or one of the dry-run policies that would have."""
    refs = [str(entry.get("policy") or ""), *str(entry.get("dry_run_policy") or "").split(",")]
    return any(_names_policy(wanted, ref) for ref in refs if ref)


# NAME, NS/NAME or NS/NAME:rules[N] (a rule only with its policy's namespace, as records name it)
_POLICY_REF = re.compile(r"^(?:[^/:]+/[^/:]+(?::rules\[\d+\])?|[^/:]+)$")


def _service_matches(wanted: str, hostname: object) -> bool:
    """``name`` or ``ns/name`` against a Service hostname ``name.ns.svc.<domain>``."""
    ns, sep, bare = wanted.rpartition("/")
    name, _, rest = str(hostname or "").partition(".")
    return name == bare and (not sep or rest.partition(".")[0] == ns)


@dataclass(frozen=True)
class RequestFilter:
    """What ``nodemesh requests`` shows; every field given must match (None: any)."""

    workload: str | None = None  # source or destination
    source: str | None = None
    destination: str | None = None
    service: str | None = None  # the Service dialled: NAME or NAMESPACE/NAME
    method: str | None = None
    path: str | None = None  # a prefix
    status: str | None = None  # "404" or "5xx"
    grpc_status: str | None = None  # "5", "NOT_FOUND" or "error"
    policy: str | None = None  # [NAMESPACE/]NAME[:rules[N]], or no-allow-match

    def __post_init__(self) -> None:
        if self.status is not None:
            parse_status(self.status)
        if self.grpc_status is not None:
            parse_grpc_status(self.grpc_status)
        for name in ("workload", "source", "destination", "service"):
            value = getattr(self, name)
            if value is not None and (not value or value.count("/") > 1 or value.endswith("/")):
                raise FilterError(f"{name} {value!r}: expected NAME or NAMESPACE/NAME")
        if self.path is not None and not self.path.startswith("/"):
            raise FilterError(f"path {self.path!r}: expected a path prefix such as /api")
        if self.policy is not None and not _POLICY_REF.match(self.policy):
            raise FilterError(
                f"policy {self.policy!r}: expected NAME, NAMESPACE/NAME or NAMESPACE/NAME:rules[N] "
                "(as the POLICY column shows it), or no-allow-match"
            )

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> RequestFilter:
        """The filter in an admin API query (``?method=GET&status=5xx``); other keys are
        left to the caller."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in query.items() if k in known})

    def query(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    def matches(self, entry: Mapping[str, object]) -> bool:
        src = (entry["source_workload"], entry["source_namespace"])
        dst = (entry["destination_workload"], entry["destination_namespace"])
        if self.workload is not None and not (
            _workload_matches(self.workload, *src) or _workload_matches(self.workload, *dst)
        ):
            return False
        if self.source is not None and not _workload_matches(self.source, *src):
            return False
        if self.destination is not None and not _workload_matches(self.destination, *dst):
            return False
        if self.service is not None and not _service_matches(
            self.service, entry.get("destination_service")
        ):
            return False
        if self.method is not None and entry["method"] != self.method.upper():
            return False
        if self.path is not None and not str(entry["path"]).startswith(self.path):
            return False
        if self.status is not None:
            low, high = parse_status(self.status)
            code = entry["response_code"]
            if not (isinstance(code, int) and low <= code < high):
                return False
        if self.grpc_status is not None:
            wanted, got = parse_grpc_status(self.grpc_status), entry.get("grpc_status")
            if not got:  # not a gRPC call
                return False
            if got != wanted and not (wanted == GRPC_ERROR and got != "0"):
                return False
        return self.policy is None or _policy_matches(self.policy, entry)
