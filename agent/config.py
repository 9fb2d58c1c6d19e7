"""Settings of the ``nodemesh agent`` command (contract 2 in the team's brief).

Parsing and validation are separate from running, so that a bad flag fails before anything
touches the kernel, and so that the rules are tested without root. Errors name the flag and
what it accepts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from agent.base.conncaps import describe_cap, per_pod_share, process_cap
from agent.base.constants import (
    ADMIN_PORT,
    CA_PORT,
    CAPTURE_MARK,
    METRICS_PORT,
    PROXY_MARK,
    READY_PORT,
    ROUTE_TABLE,
)
from agent.base.durations import parse_duration
from agent.datapath.datapath import DatapathConfig
from agent.datapath.listeners import ListenerPorts
from agent.datapath.netlink import RoutingConfig
from agent.datapath.programs import Marks
from agent.identity.caclient import CA_SERVER_NAME
from agent.identity.spiffe import valid_trust_domain
from agent.proxy.budget import (
    DEFAULT_BUDGET,
    DEFAULT_QUEUE_BUDGET,
    MAX_BUDGET,
    MAX_QUEUE_BUDGET,
    MIN_BUDGET,
    MIN_QUEUE_BUDGET,
)
from agent.proxy.h2wire import KIB, MIB, HboneSettings
from agent.proxy.hbone_limits import (
    MAX_STREAM_WINDOW,
    MIN_STREAM_WINDOW,
    STREAMS_PER_CONNECTION_WINDOW,
)
from agent.proxy.http1 import MAX_FIELDS_SETTING, MIN_FIELDS_SETTING
from agent.proxy.http1_codec import DEFAULT_MAX_FIELDS
from agent.state.model import DEFAULT_TRUST_DOMAIN
from agent.telemetry.accesslog import SampleRateError, check_sample_rate
from agent.telemetry.tracesettings import TraceSettings

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/nodemesh")
OTLP_TRACES_PATH = "/v1/traces"


class ConfigError(ValueError):
    """A flag value the agent cannot run with."""


@dataclass(frozen=True)
class CaSettings:
    """Where the agent gets certificates. ``server_name`` is the name the CA's serving
    certificate must carry (``nodemesh-ca`` for nodemesh's CA; ``istiod.istio-system.svc`` to
    use an Istio control plane as the CA); ``cert_ttl_seconds`` is the validity requested for
    workload certificates (0: the CA's default)."""

    address: str
    root: Path
    token_file: Path
    server_name: str = CA_SERVER_NAME
    cert_ttl_seconds: int = 0


@dataclass(frozen=True)
class AgentConfig:
    node: str
    pin_dir: Path
    cluster_file: Path | None = None
    kubeconfig: Path | None = None
    in_cluster: bool = False
    # the mesh's SPIFFE trust domain with a Kubernetes source (--trust-domain); a cluster
    # document names its own (``trustDomain``)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    uplinks: tuple[str, ...] = ()
    fail_open: bool = False
    splice: bool = False
    h2_relay: bool = True  # --no-h2-relay: HBONE-borne HTTP/2 terminated (H2Proxy), not relayed
    ca: CaSettings | None = None
    admin_address: tuple[str, int] = ("127.0.0.1", ADMIN_PORT)
    metrics_port: int = METRICS_PORT
    ready_port: int = READY_PORT
    drain_seconds: float = 5.0
    access_log_sample: float = 1.0
    capture_mark: int = CAPTURE_MARK
    route_table: int = ROUTE_TABLE
    listeners: ListenerPorts = field(default_factory=ListenerPorts)
    traces: TraceSettings | None = None  # --otlp-endpoint: export spans (None: no tracing)
    # --workers: proxy processes (1: the proxy runs in the agent process). The command's
    # default is auto (``_workers``); a config built in code has one process unless it says so.
    workers: int = 1
    # --hbone-window: HBONE stream receive window in bytes (the connection window is
    # ``STREAMS_PER_CONNECTION_WINDOW`` of them; ``hbone_limits.with_stream_window``).
    hbone_window: int = HboneSettings().stream_window
    # --hbone-buffer-budget: bytes all HBONE connections of the agent may hold or have promised
    # to peers, split evenly among the --workers (``agent.proxy.budget``, ``budget_share``).
    hbone_buffer_budget: int = DEFAULT_BUDGET
    # --hbone-queue-budget: bytes all HBONE connections of the agent may hold in outgoing
    # queues for peers that do not read, split the same way (``budget.QueueBudget``).
    hbone_queue_budget: int = DEFAULT_QUEUE_BUDGET
    # --max-connections: connections each proxy process may hold on its three listeners
    # together (None: derived from its descriptor limit, ``agent.base.conncaps.process_cap``).
    max_connections: int | None = None
    # --max-connections-per-pod: connections one local pod may hold through 15001 at once, in
    # each proxy process (None: half the process's cap, ``conncaps.per_pod_share``).
    max_connections_per_pod: int | None = None
    # --max-header-fields: fields an HTTP/1.1 head or trailer block may have, at either node and
    # from endpoints (``agent.proxy.http1_codec``; Envoy's max_headers_count), the client's: a
    # peer node's heads get what it added on top (``agent.proxy.http1.PEER_REQUEST``).
    max_header_fields: int = DEFAULT_MAX_FIELDS

    def connection_cap(self, nofile: int) -> int:
        """Each proxy process's cap on connections (``--max-connections``) under its limit of
        ``nofile`` descriptors; ``ConfigError`` when the flag asks for more than the limit
        leaves room for (the reserve would be eaten, and the control plane with it)."""
        room = process_cap(nofile)
        if self.max_connections is None:
            return room
        if self.max_connections > room:
            raise ConfigError(
                f"--max-connections {self.max_connections}: each proxy process can hold at most "
                f"{room} connections ({describe_cap(nofile)}); raise the agent's open-files "
                "limit (LimitNOFILE, ulimit -n) or lower --max-connections"
            )
        return self.max_connections

    def per_pod_cap(self, cap: int) -> int:
        """``--max-connections-per-pod`` in a proxy process whose cap is ``cap``."""
        if self.max_connections_per_pod is None:
            return per_pod_share(cap)
        return self.max_connections_per_pod

    @property
    def budget_share(self) -> int:
        """Each proxy process's part of ``hbone_buffer_budget``: the flag bounds the agent,
        and each worker serves its own connections."""
        return self.hbone_buffer_budget // self.workers

    @property
    def queue_budget_share(self) -> int:
        """Each proxy process's part of ``hbone_queue_budget`` (as ``budget_share``)."""
        return self.hbone_queue_budget // self.workers

    @property
    def routing(self) -> RoutingConfig:
        return RoutingConfig(
            capture_mark=self.capture_mark, table=self.route_table, rule_priority=self.route_table
        )

    def own_ports(self) -> frozenset[int]:
        """Every port this agent listens on: never a valid destination for the proxy (loop
        protection), whatever the flags moved."""
        ports = self.listeners
        return frozenset(
            {
                ports.outbound,
                ports.inbound,
                ports.hbone,
                self.admin_address[1],
                self.metrics_port,
                self.ready_port,
            }
        )

    def datapath(self) -> DatapathConfig:
        return DatapathConfig(
            pin_dir=self.pin_dir,
            uplinks=self.uplinks,
            fail_open=self.fail_open,
            marks=Marks(
                proxy_mark=PROXY_MARK,
                capture_mark=self.capture_mark,
                hbone_port=self.listeners.hbone,
            ),
            routing=self.routing,
        )


# At most this many worker processes, also for ``auto``: each holds its own HBONE pool (a
# connection per peer node and identity pair), a full copy of the state and about 37 MiB, so
# more than the agent's CPUs only costs, and the cap bounds what ``auto`` starts on a big node
# whose agent has no CPU limit.
MAX_WORKERS = 16


def _int(text: str) -> int:
    """Decimal or 0x-hex, for marks and tables. The error is argparse's message, which would
    otherwise name this function (``invalid _int value``)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number: write it in decimal or as 0x-hex, e.g. {CAPTURE_MARK:#x}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", required=True, help="this node's name (as in the state)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--cluster-file", type=Path, help="cluster document (standalone, the lab)")
    src.add_argument("--kubeconfig", type=Path, help="kubeconfig of the cluster to watch")
    src.add_argument("--in-cluster", action="store_true", help="use the pod's service account")
    parser.add_argument(
        "--trust-domain",
        metavar="DOMAIN",
        help="the mesh's SPIFFE trust domain with --kubeconfig/--in-cluster: the CA's "
        f"(nodemesh ca --trust-domain; default {DEFAULT_TRUST_DOMAIN}); a cluster document names "
        "its own (trustDomain)",
    )
    parser.add_argument(
        "--pin-dir", type=Path, help=f"bpffs directory (default: {DEFAULT_PIN_ROOT}/<node>)"
    )
    parser.add_argument(
        "--uplink",
        dest="uplinks",
        action="extend",
        nargs="+",
        default=[],
        metavar="IFACE",
        help="uplink interface(s) (default: every interface with a global IPv4 address that is "
        "not a pod's)",
    )
    parser.add_argument(
        "--fail-open",
        action="store_true",
        help="let meshed pods' connections through uncaptured while no listener is present "
        "(default: fail closed, they are dropped and retried)",
    )
    parser.add_argument(
        "--splice",
        action="store_true",
        help="same-node splice: let the kernel move the bytes of admitted same-node connections "
        "that need no per-byte work (off by default: less agent CPU per request/response, but "
        "bulk flows are slower; see ARCHITECTURE.md, Same-node splice)",
    )
    parser.add_argument(
        "--h2-relay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="relay HTTP/2 and gRPC connections that arrive through HBONE to the pod frame by "
        "frame (default; --no-h2-relay terminates them as the plaintext listener does: more "
        "agent CPU per call; see ARCHITECTURE.md, HTTP/2 and gRPC, Cost per call)",
    )
    parser.add_argument("--ca-address", metavar="HOST:PORT", help=f"mesh CA (port {CA_PORT})")
    parser.add_argument("--ca-root", type=Path, help="PEM root certificate of the mesh CA")
    parser.add_argument("--token-file", type=Path, help="bearer token presented to the CA")
    parser.add_argument(
        "--ca-server-name",
        default=CA_SERVER_NAME,
        metavar="NAME",
        help="name the CA's serving certificate must carry, whatever address is dialled "
        f"(default {CA_SERVER_NAME}; istiod.istio-system.svc for an Istio control plane)",
    )
    parser.add_argument(
        "--cert-ttl",
        type=parse_duration,
        metavar="DURATION",
        help="validity to request from the CA (--ca-address) for workload certificates, e.g. 12h "
        "(default: the CA's)",
    )
    parser.add_argument(
        "--admin-address",
        default=f"127.0.0.1:{ADMIN_PORT}",
        metavar="HOST:PORT",
        help=f"admin API (JSON; loopback only; default 127.0.0.1:{ADMIN_PORT})",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=METRICS_PORT, help=f"/metrics (default {METRICS_PORT})"
    )
    parser.add_argument(
        "--ready-port",
        type=int,
        default=READY_PORT,
        help=f"/healthz/ready (default {READY_PORT})",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="on SIGTERM, how long open connections may finish (default 5)",
    )
    parser.add_argument(
        "--workers",
        default="auto",
        metavar="N|auto",
        help=f"proxy worker processes, each with its own event loop and listeners (1 to "
        f"{MAX_WORKERS}; 1: the proxy runs in the agent's own process). Default auto: the CPUs "
        f"the agent may use by its affinity and cgroup CPU quota, at most {MAX_WORKERS}, and 1 "
        "without a CA",
    )
    parser.add_argument(
        "--hbone-window",
        default=_size_text(HboneSettings().stream_window),
        metavar="SIZE",
        help=f"HBONE flow-control window per stream, e.g. 512KiB or 4MiB "
        f"({_size_text(MIN_STREAM_WINDOW)} to {_size_text(MAX_STREAM_WINDOW)}; default "
        f"%(default)s); each HBONE connection's window is {STREAMS_PER_CONNECTION_WINDOW} times "
        "it. Larger: less proxy CPU per GB on bulk streams; smaller: less memory a slow pod or "
        "a hostile peer can make the agent hold (see ARCHITECTURE.md, HBONE windows)",
    )
    parser.add_argument(
        "--hbone-buffer-budget",
        default=_size_text(DEFAULT_BUDGET),
        metavar="SIZE",
        help=f"bytes all HBONE connections of the agent may hold (received, not yet written to "
        f"the pod) or have promised to peers (open flow-control windows), together, e.g. 256MiB "
        f"or 1GiB ({_size_text(MIN_BUDGET)} to {_size_text(MAX_BUDGET)}; default %(default)s; "
        "split evenly among --workers). When it is used up, window updates are withheld until "
        "bytes drain; each connection keeps HTTP/2's initial 64 KiB (see ARCHITECTURE.md, "
        "HBONE buffer budget)",
    )
    parser.add_argument(
        "--hbone-queue-budget",
        default=_size_text(DEFAULT_QUEUE_BUDGET),
        metavar="SIZE",
        help=f"bytes all HBONE connections of the agent may hold in outgoing queues (pod data "
        f"waiting for a peer's flow-control windows or for the peer to read its socket), "
        f"together, e.g. 64MiB or 256MiB ({_size_text(MIN_QUEUE_BUDGET)} to "
        f"{_size_text(MAX_QUEUE_BUDGET)}; default %(default)s; split evenly among --workers). "
        "When it is used up, the agent stops reading from the pods whose tunnels hold more than "
        "64 KiB until bytes drain (see ARCHITECTURE.md, HBONE buffer budget)",
    )
    parser.add_argument(
        "--max-connections",
        default="auto",
        metavar="N|auto",
        help="connections each proxy process (the agent, or each of its --workers) may hold on "
        "15001, 15006 and 15008 together; more are reset at once and counted "
        '(nodemesh_rejected_connections_total{reason="global_connection_limit"}). Default '
        "auto: from the open-files limit, leaving a reserve for the agent's control plane, two "
        "descriptors per connection; an HBONE stream's pod socket and an h2 client's socket to "
        "a same-node or unmeshed endpoint take one each from the same budget, past it 503 "
        "(reason global_stream_limit; see ARCHITECTURE.md, What outside input can make the agent "
        "hold)",
    )
    parser.add_argument(
        "--max-connections-per-pod",
        default="auto",
        metavar="N|auto",
        help="connections one local pod may hold open through the proxy (15001) at once, in "
        "each proxy process; more are reset at once and counted "
        '(nodemesh_rejected_connections_total{reason="pod_connection_limit"}). Default auto: '
        "half of --max-connections, so that one pod can never take the others' half",
    )
    parser.add_argument(
        "--max-header-fields",
        default=str(DEFAULT_MAX_FIELDS),
        metavar="N",
        help=f"header fields an HTTP/1.1 request or response head, or a trailer block, may have "
        f"({MIN_FIELDS_SETTING} to {MAX_FIELDS_SETTING}; default %(default)s, Envoy's "
        "max_headers_count); a client's head past it is answered 431 naming the count, an "
        "endpoint's response 502 (503 at the source for a far one). Counted as the client (or "
        "pod) sent it: a node admits on top what the other node adds (x-request-id), not what "
        "an HTTPRoute's filters add. HTTP/2 header blocks are "
        "bounded by their 16 KiB header list size instead, the client's alike (see "
        "ARCHITECTURE.md, What outside input can make the agent hold)",
    )
    parser.add_argument(
        "--access-log-sample",
        type=float,
        default=1.0,
        metavar="RATE",
        help="fraction of HTTP requests written to the access log, 0 to 1 (default 1: all); "
        "5xx responses, policy denials and failed requests are always written",
    )
    parser.add_argument(
        "--capture-mark", type=_int, default=CAPTURE_MARK, help="fwmark of captured packets"
    )
    parser.add_argument(
        "--route-table", type=_int, default=ROUTE_TABLE, help="table for captured packets"
    )
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export a span per HTTP request over OTLP/HTTP (protobuf) to this collector, e.g. "
        f"http://otel-collector:4318 (the path defaults to {OTLP_TRACES_PATH})",
    )
    parser.add_argument(
        "--trace-sample",
        type=float,
        metavar="RATE",
        help="share of new traces to keep, 0 to 1 (default 1); a caller's sampled or unsampled "
        "trace context is followed",
    )
    parser.add_argument(
        "--trace-tcp", action="store_true", help="also export a span per TCP connection"
    )
    parser.add_argument(
        "--uninstall",
        action="store_true",
        help="remove this agent's filters, rules, routes and pinned objects, then exit",
    )


def _trust_domain(args: argparse.Namespace) -> str:
    """``--trust-domain``, checked: a SPIFFE trust domain, and only with a Kubernetes source.
    Why a flag: the CA signs identities in its own trust domain (``nodemesh ca --trust-domain``)
    and refuses requests for another, so agents that assumed the default while the CA was given
    another could obtain no certificate at all."""
    if args.trust_domain is None:
        return DEFAULT_TRUST_DOMAIN
    if args.cluster_file:
        raise ConfigError(
            "--trust-domain is for a Kubernetes source: the cluster document names the trust "
            "domain itself (trustDomain); set it there"
        )
    if not valid_trust_domain(args.trust_domain):
        raise ConfigError(
            f"--trust-domain {args.trust_domain!r}: expected a lowercase DNS name such as "
            f"{DEFAULT_TRUST_DOMAIN} or example.org, the CA's --trust-domain"
        )
    return str(args.trust_domain)


def _workers(value: str, *, has_ca: bool) -> int:
    """``--workers``: a count, or ``auto`` (the CPUs this process may use, capped; 1 without a
    CA, since only the node proxy runs in workers and without a CA there is none)."""
    if value == "auto":
        from agent.base.cpus import usable_cpus_here

        return min(usable_cpus_here(), MAX_WORKERS) if has_ca else 1
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(
            f"--workers {value}: expected a number of processes (1 to {MAX_WORKERS}) or auto"
        ) from None
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(f"--workers {value}: expected 1 to {MAX_WORKERS} processes")
    return count


def _connections(flag: str, value: str, auto: str) -> int | None:
    """``--max-connections`` and ``--max-connections-per-pod``: a count of at least 1, or
    ``auto`` (None), which ``auto`` explains in the error."""
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(
            f"{flag} {value}: expected a number of connections (1 or more), or auto ({auto})"
        )
    return int(value)


def _header_fields(value: str) -> int:
    """``--max-header-fields``: a count within the allowed range (``agent.proxy.http1``)."""
    if not value.isdigit() or not MIN_FIELDS_SETTING <= int(value) <= MAX_FIELDS_SETTING:
        raise ConfigError(
            f"--max-header-fields {value}: expected {MIN_FIELDS_SETTING} to {MAX_FIELDS_SETTING} "
            f"header fields per HTTP/1.1 head (default {DEFAULT_MAX_FIELDS}): fewer refuses "
            "ordinary requests (a client's own Host, User-Agent, Accept, body and trace fields "
            "come near it; what the proxies add is not counted), and a 60 KiB head holds no more"
        )
    return int(value)


def _size_text(size: int) -> str:
    """512KiB, 4MiB, 64GiB: how ``--hbone-window`` and ``--hbone-buffer-budget`` values are
    written."""
    if size % GIB == 0:
        return f"{size // GIB}GiB"
    return f"{size // MIB}MiB" if size % MIB == 0 else f"{size // KIB}KiB"


GIB = 1024 * MIB
_SIZE_UNITS = {"": 1, "k": KIB, "kib": KIB, "m": MIB, "mib": MIB, "g": GIB, "gib": GIB}


def _size(flag: str, value: str, example: str) -> int:
    """Bytes, or a number with KiB, MiB or GiB (K, M, G)."""
    text = value.strip()
    digits = text.rstrip("KkMmGgIiBb")
    unit = _SIZE_UNITS.get(text[len(digits) :].lower())
    if not digits.isdigit() or unit is None:
        raise ConfigError(f"{flag} {value}: expected a size such as {example}")
    return int(digits) * unit


def _hbone_buffer_budget(value: str) -> int:
    """``--hbone-buffer-budget``: a size within the allowed range."""
    why = (
        "at least one connection window at the default --hbone-window; it bounds the memory all "
        "HBONE connections of the agent can make it hold"
    )
    return _ranged_size(
        "--hbone-buffer-budget", value, "256MiB or 1GiB", MIN_BUDGET, MAX_BUDGET, why
    )


def _hbone_queue_budget(value: str) -> int:
    """``--hbone-queue-budget``: a size within the allowed range."""
    why = (
        "at least two connections' outgoing queue cap, so one bulk stream never waits for it; "
        "it bounds the memory peers that do not read can make the agent hold"
    )
    return _ranged_size(
        "--hbone-queue-budget", value, "64MiB or 256MiB", MIN_QUEUE_BUDGET, MAX_QUEUE_BUDGET, why
    )


def _hbone_window(value: str) -> int:
    """``--hbone-window``: a size within the allowed range."""
    why = (
        f"the connection window is {STREAMS_PER_CONNECTION_WINDOW} times it, and it bounds what "
        "one HBONE peer can make the agent hold"
    )
    return _ranged_size(
        "--hbone-window", value, "512KiB or 4MiB", MIN_STREAM_WINDOW, MAX_STREAM_WINDOW, why
    )


def _ranged_size(flag: str, value: str, example: str, low: int, high: int, why: str) -> int:
    """A size (``_size``) from ``low`` to ``high``; the error says the range and ``why``."""
    size = _size(flag, value, example)
    if not low <= size <= high:
        raise ConfigError(
            f"{flag} {value}: expected {_size_text(low)} to {_size_text(high)} ({why})"
        )
    return size


def _host_port(flag: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} {value!r}: expected HOST:PORT, e.g. 127.0.0.1:{ADMIN_PORT}")
    return host, int(port)


def _otlp_url(value: str) -> str:
    """The full OTLP/HTTP traces URL of ``--otlp-endpoint`` (a bare collector address gets the
    standard path)."""
    url = urlsplit(value)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"--otlp-endpoint {value!r}: expected an http(s) URL of an OTLP/HTTP collector, "
            "e.g. http://otel-collector.observability:4318"
        )
    if url.username or url.password:
        raise ConfigError(
            "--otlp-endpoint: credentials in the URL would show in logs and /config_dump; "
            "pass them as a header with OTEL_EXPORTER_OTLP_TRACES_HEADERS instead"
        )
    try:
        url.port  # noqa: B018 (parses it: raises on a bad port)
    except ValueError as e:
        raise ConfigError(f"--otlp-endpoint {value!r}: {e}") from e
    if url.path in ("", "/"):
        url = url._replace(path=OTLP_TRACES_PATH)
    return urlunsplit(url)


def _traces(args: argparse.Namespace) -> TraceSettings | None:
    if not args.otlp_endpoint:
        if args.trace_sample is not None or args.trace_tcp:
            raise ConfigError("--trace-sample and --trace-tcp need --otlp-endpoint URL")
        return None
    rate = 1.0 if args.trace_sample is None else args.trace_sample
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(
            f"--trace-sample {args.trace_sample}: expected a share between 0 and 1, e.g. 0.1"
        )
    return TraceSettings(_otlp_url(args.otlp_endpoint), sample_rate=rate, tcp=args.trace_tcp)


def _port(flag: str, value: int) -> int:
    if not 0 < value < 65536:
        raise ConfigError(f"{flag} {value}: expected a port between 1 and 65535")
    return value


def from_args(args: argparse.Namespace) -> AgentConfig:
    """Validate parsed flags into an ``AgentConfig``."""
    if not args.uninstall and not (args.cluster_file or args.kubeconfig or args.in_cluster):
        raise ConfigError(
            "the agent needs a state source: --cluster-file PATH, --kubeconfig PATH or --in-cluster"
        )
    trust_domain = _trust_domain(args)
    if "/" in args.node or not args.node:
        raise ConfigError(f"--node {args.node!r}: expected a node name (no '/')")
    ca_flags = (args.ca_address, args.ca_root, args.token_file)
    if any(ca_flags) and not all(ca_flags):
        raise ConfigError("--ca-address, --ca-root and --token-file go together: give all three")
    ca = None
    if args.cert_ttl is not None and not args.ca_address:
        raise ConfigError(
            "--cert-ttl is the validity to ask the CA for, and no CA is set: add --ca-address, "
            "--ca-root and --token-file, or leave --cert-ttl out"
        )
    if args.cert_ttl is not None and args.cert_ttl.total_seconds() <= 0:
        raise ConfigError(
            "--cert-ttl is 0: expected a validity such as 12h (a CA takes 0 as its own default, "
            "so leave --cert-ttl out for that)"
        )
    if args.ca_address:
        _host_port("--ca-address", args.ca_address)
        ttl = int(args.cert_ttl.total_seconds()) if args.cert_ttl else 0
        ca = CaSettings(args.ca_address, args.ca_root, args.token_file, args.ca_server_name, ttl)
    admin = _host_port("--admin-address", args.admin_address)
    if admin[0] not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(
            f"--admin-address {args.admin_address}: the admin API only listens on loopback "
            "(127.0.0.1); use a port-forward to reach it"
        )
    if args.drain_seconds < 0:
        raise ConfigError(f"--drain-seconds {args.drain_seconds}: expected 0 or more seconds")
    workers = _workers(str(args.workers), has_ca=bool(args.ca_address))
    if workers > 1 and not args.ca_address:
        raise ConfigError(
            f"--workers {args.workers} runs the node proxy in worker processes, which needs a CA "
            "(--ca-address); without one the agent is a plain passthrough: use --workers 1"
        )
    try:
        check_sample_rate(args.access_log_sample)
    except SampleRateError as e:
        raise ConfigError(str(e)) from e
    if args.capture_mark in (0, PROXY_MARK):
        raise ConfigError(
            f"--capture-mark {args.capture_mark:#x}: must be non-zero and differ from the "
            f"proxy mark {PROXY_MARK:#x}"
        )
    if not 0 < args.route_table < 2**32 or args.route_table in (253, 254, 255):
        raise ConfigError(
            f"--route-table {args.route_table}: expected a free table number (not 253-255, "
            "which are default/main/local)"
        )
    return AgentConfig(
        node=args.node,
        pin_dir=args.pin_dir or DEFAULT_PIN_ROOT / args.node,
        cluster_file=args.cluster_file,
        kubeconfig=args.kubeconfig,
        in_cluster=args.in_cluster,
        trust_domain=trust_domain,
        uplinks=tuple(args.uplinks),
        fail_open=args.fail_open,
        splice=args.splice,
        h2_relay=args.h2_relay,
        ca=ca,
        admin_address=admin,
        metrics_port=_port("--metrics-port", args.metrics_port),
        ready_port=_port("--ready-port", args.ready_port),
        drain_seconds=args.drain_seconds,
        access_log_sample=args.access_log_sample,
        capture_mark=args.capture_mark,
        route_table=args.route_table,
        traces=_traces(args),
        workers=workers,
        hbone_window=_hbone_window(str(args.hbone_window)),
        hbone_buffer_budget=_hbone_buffer_budget(str(args.hbone_buffer_budget)),
        hbone_queue_budget=_hbone_queue_budget(str(args.hbone_queue_budget)),
        max_connections=_connections(
            "--max-connections", str(args.max_connections), "from the open-files limit"
        ),
        max_connections_per_pod=_connections(
            "--max-connections-per-pod",
            str(args.max_connections_per_pod),
            "half of --max-connections",
        ),
        max_header_fields=_header_fields(str(args.max_header_fields)),
    )
