"""How many connections the proxy's listeners may hold: per source address, and per process.

Why: every connection a listener accepts holds a file descriptor, and almost every one holds a
second for its upstream. Descriptors are one per-process pool (``RLIMIT_NOFILE``) that the
agent's control plane draws from too: its Kubernetes watches, CA calls, the metrics, readiness
and admin servers, the BPF maps. Without a bound, one pod that opens connections without end
(a bug, a compromised pod), or a client holding many addresses on 15006, or many peers on
15008, used the pool up, and then every other pod on the node and the agent itself starved:
``accept`` failed with EMFILE, a watch could not reconnect, readiness could not answer.

Two bounds, checked where a connection is accepted, before a task or anything upstream exists
(``agent.acceptor.accept_forever``); past either the connection is reset at once and counted in
the proxy's rejection counter, and logged once while the source (or the process) stays at it:

- **per source address** on a listener (``SourceLimit``): on 15001, connections one local pod
  holds open through the proxy at once (``--max-connections-per-pod``, default auto: half the
  process's cap, ``per_pod_share``), reason ``pod_connection_limit``. 15006 and 15008 have their own
  per-address limit in the node proxy (``InboundLimits.max_connections_per_peer``); without a CA
  (plain passthrough, ``agent.proxy.passthrough``) it is applied here, with the same reason
  ``peer_connection_limit``.
- **per process**, all three listeners together (``--max-connections``, default derived from
  the descriptor limit: ``process_cap``), reason ``global_connection_limit`` (Envoy's overload
  manager calls its equivalent ``global_downstream_max_connections``).

The arithmetic (``process_cap``). ``L`` is the soft ``RLIMIT_NOFILE`` the agent runs with (it
raises the soft limit to the hard one at start, as Go programs do: ``raise_descriptor_limit``).
A reserve ``R = min(1024 + L/8, L/2)`` is never given to accepted connections: 1,024 for what
the agent holds whatever its traffic (standard streams, listeners, the metrics, readiness and
admin servers with up to 64 connections each, BPF programs and maps, Kubernetes watches, the CA
channel, log files, the workers' control sockets), the idle pooled HTTP sessions (at most 512)
and mirror copies (64); ``L/8`` for upstream descriptors that are not one per accepted
connection: HBONE tunnels kept in the pool after their last stream and the pooled connections
the h2 source's tunnels share (the sockets beyond a connection's own upstream are charged one by
one: below). Every
accepted connection is charged two descriptors, its own and its upstream's (on 15001 the pod's
or the passthrough socket, or at most one pooled HBONE connection, usually a share of one; on
15006 the pod's socket; on 15008 the tunnel's and, with a node proxy, one per stream: below),
so the cap is ``(L - R) // 2``: 458,240 connections at
L = 1,048,576, 28,160 at 65,536, 256 at 1,024.

HBONE streams (``count_streams``, the node proxy's 15008 handler): every stream of an inbound
HBONE connection opens its own socket to the local pod, up to 100 per connection, so charging a
15008 connection two descriptors left its other streams' sockets uncounted (peers holding many
connections with many streams each could use the descriptors up despite the cap). With a node
proxy the charge is split where the descriptors are: a 15008 connection is charged one, its
own, when accepted, and each of its streams one, its pod socket's, taken before the connect
(``take_stream``) and given back when that socket is closed or was never made
(``release_stream``). A connection with one stream costs two, as before; an idle one one (its
own descriptor is all it holds); one with 100 streams 101. The budget is in descriptors,
``total * 2``: ``total`` stays what ``--max-connections`` and the derivation above give, the
number of two-descriptor connections the process holds at most. Every stream is charged, not
those past a connection's first: no per-connection state to keep, and the charges are exactly
the descriptors held. A stream the budget has no room for is answered 503 on its CONNECT (the
connection keeps serving its other streams, as for an unreachable pod) and counted as
``global_stream_limit``: not ``global_connection_limit``, whose refusal is a reset at accept,
because the client sees a different thing (a 503 on a live connection) and the dashboards
should tell the two apart; the fix is the same. Without a node proxy (plain passthrough) a
15008 connection is relayed whole to one upstream and keeps its charge of two.

The h2 source (``agent.proxy.h2outbound``) likewise: a client connection to a Service port
declared HTTP/2 or gRPC opens one upstream per (backend Service, port, endpoint) its requests
are balanced to, kept until the endpoint, the client or the Service's idle timeout ends it. A
far endpoint's is a stream of a pooled HBONE connection (no descriptor of its own), but a
same-node or unmeshed endpoint's is a socket: one connection could hold one per such endpoint
of every backend its routes reach (a Service of 500 unmeshed endpoints, 500 sockets), on a
charge of two. Each such socket takes a descriptor the same way (``take_stream``) before its
connect and gives it back when closed. While the budget is full (``full``) each pick of an
endpoint prefers, among the candidates of the backend the route already chose, one that needs
no new socket: a far endpoint, or one this session holds a socket to (``Attempts.narrow``, so
the subset split and the route's weights are kept, and with room the balancer's choice is
unchanged). Only when the backend has none are the requests waiting for a new socket answered
503 ``UO`` (gRPC ``UNAVAILABLE``), also counted as ``global_stream_limit``, and the connection
serves on (the session's own charged upstream is then a spare: over-counted by one, not
under). The HTTP/1.1 source holds one upstream session per client connection at a time (its
charged upstream); idle pooled sessions (at most 512) and mirror copies (64) are in the reserve.

With ``--workers N`` every worker is a process with its own descriptor table and its own
``RLIMIT_NOFILE`` (inherited from the main process): each derives its own cap from its own
limit and counts its own connections, per process and per source (as 15006 and 15008 count per
worker), so the node's total is N times the per-process cap.
"""

from __future__ import annotations

import logging
import resource
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.base.constants import Listener

log = logging.getLogger(__name__)

# By default one pod may hold through 15001 at most this share of its process's cap: a pod
# that leaks connections can never take the other pods' half. A share, not a fixed count:
# neither ztunnel nor Linkerd limits a pod, and a fixed count low enough to matter (Envoy's
# 1,024 connections per upstream cluster is its most raised default) would refuse a gateway
# or a load generator that the node has room for. 229,120 at 1,048,576 descriptors, 14,080 at
# 65,536, 128 at 1,024.
POD_SHARE = 2
# Descriptors each accepted connection is charged: its own and its upstream's.
DESCRIPTORS_PER_CONNECTION = 2
# What the agent holds whatever its traffic (the module docstring lists it).
FIXED_RESERVE = 1024
# The most the agent raises its soft limit to (Linux's default ``fs.nr_open``).
MAX_NOFILE = 1 << 20

# Rejection reasons (``nodemesh_rejected_connections_total{reason}``).
POD_LIMIT = "pod_connection_limit"
PEER_LIMIT = "peer_connection_limit"
GLOBAL_LIMIT = "global_connection_limit"
STREAM_LIMIT = "global_stream_limit"

Reject = Callable[..., None]  # ``(reason, detail, *, quiet=False)``, as ``Registry.reject``


def descriptor_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` in force (unlimited counts as ``MAX_NOFILE``)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_NOFILE if soft == resource.RLIM_INFINITY else soft


def raise_descriptor_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one (at most ``MAX_NOFILE``) and return the
    soft limit now in force. Container runtimes often start processes at a soft limit of 1,024
    with a far higher hard one, a limit meant for ``select()`` users; the agent uses epoll."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_NOFILE if hard == resource.RLIM_INFINITY else min(hard, MAX_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, want, e)
    return descriptor_limit()


def reserve_for(nofile: int) -> int:
    """Descriptors never given to accepted connections under a limit of ``nofile``."""
    return min(FIXED_RESERVE + nofile // 8, nofile // 2)


def process_cap(nofile: int) -> int:
    """Connections a proxy process may hold at once under a limit of ``nofile`` descriptors."""
    return max(1, (nofile - reserve_for(nofile)) // DESCRIPTORS_PER_CONNECTION)


def per_pod_share(cap: int) -> int:
    """The default of ``--max-connections-per-pod`` under a process cap of ``cap``."""
    return max(1, cap // POD_SHARE)


def describe_cap(nofile: int) -> str:
    """The arithmetic behind ``process_cap(nofile)``, for log lines and errors."""
    return (
        f"RLIMIT_NOFILE {nofile}, less a reserve of {reserve_for(nofile)} for the control plane "
        f"and pooled upstreams, {DESCRIPTORS_PER_CONNECTION} descriptors per connection: "
        f"{process_cap(nofile)}"
    )


class PeerSlots:
    """Connections held per source address, and which refusals to log: the first one since the
    source reached its limit, not the others while it stays there, so a source that keeps
    opening connections past the limit (each refusal costs it one round trip) cannot make the
    agent write a log line for each; they are all counted. Once one of its connections ends,
    its next refusal is logged again. (15008 and 15006 keep one each in the node proxy, and
    each accept loop's ``Gate`` one for its per-source limit.) A plain dict, not a ``Counter``:
    this runs for every connection, and a ``Counter`` calls ``__missing__``, in Python, for
    every source that held nothing."""

    __slots__ = ("_told", "held")

    def __init__(self) -> None:
        self.held: dict[str, int] = {}  # only sources holding at least one
        self._told: set[str] = set()  # sources whose refusal was logged since they were below

    def at_limit(self, peer: str, most: int) -> bool:
        return self.held.get(peer, 0) >= most

    def take_within(self, peer: str, most: int) -> bool:
        """``take(peer)`` unless it holds ``most`` already (then False): one call at accept."""
        held = self.held
        count = held.get(peer, 0)
        if count >= most:
            return False
        held[peer] = count + 1
        return True

    def first_refusal(self, peer: str) -> bool:
        """Whether this refusal of ``peer`` is the one to log (see the class)."""
        if peer in self._told:
            return False
        self._told.add(peer)
        return True

    def take(self, peer: str) -> None:
        held = self.held
        held[peer] = held.get(peer, 0) + 1

    def release(self, peer: str) -> None:
        held = self.held
        count = held[peer] - 1
        if count:
            held[peer] = count
        else:
            del held[peer]
        if self._told:
            self._told.discard(peer)


@dataclass(frozen=True, slots=True)
class SourceLimit:
    """At most ``most`` connections from one source address on a listener; refusals are
    counted as ``reason`` and named ``who`` in the log (``pod``, ``client``)."""

    most: int
    reason: str
    who: str


class ConnectionCaps:
    """One proxy process's admission at accept (the module docstring): ``gate(listener)`` gives
    each accept loop its ``Gate``; with a node proxy, ``count_streams()`` and then
    ``take_stream``/``release_stream`` for each stream's socket. Refusals go
    to ``reject`` (the node proxy's registry, so they show in its rejection counter; by default
    this object's own ``rejections``).

    The budget is in descriptors (``budget = total * 2``), ``used`` what is charged now: 2 per
    connection (1 on 15008 once streams are counted) and 1 per stream; ``held`` and ``streams``
    count the connections and streams themselves, for the log and the tests."""

    __slots__ = (
        "_gated",
        "budget",
        "full_told",
        "held",
        "per_source",
        "reject",
        "rejections",
        "streams",
        "streams_counted",
        "total",
        "used",
        "why",
    )

    def __init__(
        self, total: int, per_source: Mapping[Listener, SourceLimit], *, why: str = ""
    ) -> None:
        self.total = total
        self.budget = total * DESCRIPTORS_PER_CONNECTION
        self.used = 0  # descriptors charged
        self.held = 0  # connections admitted and not yet released
        self.streams = 0  # streams' sockets held: HBONE streams', h2 sessions' (``take_stream``)
        self.streams_counted = False  # ``count_streams`` was called
        self.per_source = dict(per_source)
        self.why = why  # how ``total`` was chosen, for the log line at the cap
        self.rejections: Counter[str] = Counter()
        self.reject: Reject = self._count
        self.full_told = False  # the refusal at the cap was logged since the process was below
        self._gated: set[Listener] = set()

    def gate(self, listener: Listener) -> Gate:
        self._gated.add(listener)
        charge = DESCRIPTORS_PER_CONNECTION
        if listener is Listener.HBONE and self.streams_counted:
            charge = 1  # its own; its streams' pod sockets are charged one by one
        return Gate(self, listener, self.per_source.get(listener), charge)

    def count_streams(self) -> None:
        """The node proxy charges each inbound HBONE stream's pod socket (``take_stream``), so
        a 15008 connection is charged only its own descriptor. Before the 15008 gate is made:
        a gate made earlier would charge its connections the stream a second time."""
        if Listener.HBONE in self._gated:
            raise RuntimeError("count_streams() after the HBONE listener's gate was made")
        self.streams_counted = True

    def take_stream(self, where: str) -> bool:
        """A descriptor for a stream's socket (an inbound HBONE stream's to its pod, an h2 source
        session's to a same-node or unmeshed endpoint), before the connect; False
        (counted and logged as ``global_stream_limit``) when the budget has no room: answer
        the stream 503. Every True is followed by exactly one ``release_stream``."""
        if self.used >= self.budget:
            self._refuse_stream(where)
            return False
        self.used += 1
        self.streams += 1
        return True

    def release_stream(self) -> None:
        """The socket ``take_stream`` was for is closed, or was never made. Each caller gives
        back where it closes that socket, once; a give-back with none held raises (a slot given
        back twice: the accounting is broken) rather than making room that is not there, and
        the tests see every count return to zero after every way a stream ends."""
        if self.streams <= 0:
            raise RuntimeError("a stream's descriptor was given back twice")
        self.streams -= 1
        self.used -= 1
        self.full_told = False

    def _count(self, reason: str, detail: str, *, quiet: bool = False) -> None:
        self.rejections[reason] += 1
        if not quiet:
            log.info("rejected (%s): %s", reason, detail)

    def _holding(self) -> str:
        streams = f" and {self.streams} streams' sockets" if self.streams_counted else ""
        return (
            f"this process holds {self.held} connections{streams}, its cap of {self.total} "
            f"connections' descriptors ({self.why or '--max-connections'})"
        )

    def refuse_full(self, listener: Listener, source: str) -> None:
        self._at_budget(GLOBAL_LIMIT, f"{listener.name.lower()} from {source}: ")

    def _refuse_stream(self, where: str) -> None:
        self._at_budget(STREAM_LIMIT, f"{where}: answered 503, ")

    def _at_budget(self, reason: str, what: str) -> None:
        """A refusal for want of descriptors: counted, logged only the first time since the
        process was below its budget."""
        first, self.full_told = not self.full_told, True
        self.reject(
            reason,
            f"{what}{self._holding()}; more are counted, not logged, until one of them ends (if "
            "the node needs more, raise the agent's open-files limit, LimitNOFILE, or "
            "--max-connections)",
            quiet=not first,
        )


class Gate:
    """A listener's admission: ``admit(source)`` before anything is done for a connection
    (False: refuse it), ``release(source)`` once it ended, however it ended: a compare, and
    for a listener with a per-source limit its ``PeerSlots``. ``charge``: the descriptors each
    connection is charged (``ConnectionCaps.gate``)."""

    __slots__ = ("_caps", "_charge", "_last", "_listener", "_most", "_slots", "limit")

    def __init__(
        self,
        caps: ConnectionCaps,
        listener: Listener,
        limit: SourceLimit | None,
        charge: int = DESCRIPTORS_PER_CONNECTION,
    ):
        self._caps = caps
        self._listener = listener
        self.limit = limit
        self._charge = charge
        self._last = caps.budget - charge  # admitted while ``used`` is at most this
        # Connections held per source; None: no per-source limit.
        self._slots = PeerSlots() if limit is not None else None
        self._most = limit.most if limit is not None else 0

    @property
    def held(self) -> dict[str, int]:
        """Connections held per source (empty for a listener without a per-source limit)."""
        return dict(self._slots.held) if self._slots is not None else {}

    def admit(self, source: str) -> bool:
        caps = self._caps
        if caps.used > self._last:
            caps.refuse_full(self._listener, source)
            return False
        slots = self._slots
        if slots is not None and not slots.take_within(source, self._most):
            self._refuse(slots, source)
            return False
        caps.used += self._charge
        caps.held += 1
        return True

    def _refuse(self, slots: PeerSlots, source: str) -> None:
        limit = self.limit
        assert limit is not None
        first = slots.first_refusal(source)
        self._caps.reject(
            limit.reason,
            f"{self._listener.name.lower()} from {source}: {limit.most} connections from that "
            f"{limit.who} already (more are counted, not logged, until one of them ends)",
            quiet=not first,
        )

    def release(self, source: str) -> None:
        if self._slots is not None:
            self._slots.release(source)
        caps = self._caps
        caps.used -= self._charge
        caps.held -= 1
        caps.full_told = False
