"""What both destination cores share: ``H2Core``, the base of ``H2Proxy`` and of the frame
relay (``agent.proxy.h2relay.H2Relay``).

Why a module of its own: a destination serves a client connection with either core (the relay
by default, ``H2Proxy`` with ``--no-h2-relay``), behind one shell, so what the shell sees of
them must not differ: the same settings, the same preface sniffing (an HTTP/1.x client is
answered in HTTP/1.1 alone), the same flood counts, the same request head and id for policy and
telemetry, the same refusals by cause. Kept apart from ``H2Proxy``'s stream logic, it is what a
change to either core must keep, in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from h2.errors import ErrorCodes

from agent.policy.paths import normalized_path
from agent.proxy.h2exchange import Authorize, H2Exchange, Header
from agent.proxy.h2guard import (
    HTTP1_ON_H2,
    HTTP1_ON_H2_ANSWER,
    HeaderBlockGuard,
    PrefaceSniff,
)
from agent.proxy.h2limits import HEADER_TIMEOUT, H2Limits
from agent.proxy.http1 import RequestHead
from agent.proxy.http1_codec import bounded
from agent.telemetry.records import trace_headers_of

# The reset a destination sends its client for a stream whose pod connection was lost after
# the response began (RFC 9113 8.5: "the connection ... was reset or abnormally closed"): a
# transport failure, which the source (``H2Proxy``) turns into what it sends for its own
# endpoint connection's loss (trailers ``grpc-status: 14`` after whole messages), so the relay
# needs no message tracking of its own; any other client sees INTERNAL, as before.
POD_LOST = ErrorCodes.CONNECT_ERROR


def passed_on(code: int) -> int:
    """The reset a client is sent for its endpoint's reset ``code`` of a stream whose response
    began: the same (gRPC's mapping: CANCEL ``CANCELLED``, REFUSED_STREAM ``UNAVAILABLE``,
    ENHANCE_YOUR_CALM ``RESOURCE_EXHAUSTED``, INADEQUATE_SECURITY ``PERMISSION_DENIED``), as
    Envoy passes an HTTP/2 peer's on; NO_ERROR before the response's end is INTERNAL_ERROR (a
    response cut short is no graceful end, and gRPC maps both to ``INTERNAL``)."""
    return ErrorCodes.INTERNAL_ERROR if code == ErrorCodes.NO_ERROR else code


class H2Core:
    """What both destination cores hold and hand their shell besides bytes: ``H2Proxy`` and the
    frame relay (``agent.proxy.h2relay.H2Relay``) serve one shell, so they take the same
    settings (the authorizer, limits and the header-block guard built from them, the clock, the
    request ids) and keep the finished exchanges, the refusals by cause and the last refusal's
    detail (``refusal``, for the shell's log line, as ``Http1Proxy.refusal``) the same way."""

    def __init__(
        self,
        authorize: Authorize,
        limits: H2Limits | None,
        clock: Callable[[], float],
        new_request_id: Callable[[], str],
    ) -> None:
        self.authorize = authorize
        self.limits = limits = limits or H2Limits()
        self.clock = clock
        self.new_request_id = new_request_id
        self.guard = HeaderBlockGuard(
            max_header_block=limits.max_header_block, max_continuations=limits.max_continuations
        )
        self.closing = False  # flush, then close both sides
        self.head_started: float | None = None  # clock time an unfinished header block began
        self.refusal: str | None = None
        self._completed: list[H2Exchange] = []
        self._rejections: list[str] = []
        # The flood limits' counts (``H2Limits``), kept alike by both cores.
        self._unsent_replies = 0  # bytes of replies the client's frames queued since taken
        self._opened = 0  # streams the client opened
        self._premature_resets = 0  # of them, reset by the client before their response
        self._empty_frames = 0  # consecutive empty DATA frames without END_STREAM
        # Until the client's preface came nothing of ours goes to it (``_opening``), so that an
        # HTTP/1.x client is answered in HTTP/1.1 alone.
        self._sniff: PrefaceSniff | None = PrefaceSniff()
        self._http1_answer = b""  # the 400 an HTTP/1.x client gets, until taken
        # The last client stream our GOAWAY took (``drain``): a later one crossed it, refused.
        self._last_taken: int | None = None

    def _opening(self, data: bytes) -> bytes | None:
        """The client's bytes to parse as HTTP/2, or None while its first bytes are held (not
        yet the whole preface) or were an HTTP/1.x request (refused: ``HTTP1_ON_H2``)."""
        sniff = self._sniff
        assert sniff is not None
        verdict = sniff.feed(data)
        if verdict == PrefaceSniff.MORE:
            return None
        if verdict == PrefaceSniff.HTTP1:
            line = sniff.held.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
            why = "on a port declared HTTP/2: send h2c prior knowledge or declare it http"
            self._reject(HTTP1_ON_H2, f"{bounded(line, 28)} {why}")
            self._http1_answer = HTTP1_ON_H2_ANSWER
            self.closing = True
            return None
        self._sniff = None
        return sniff.held

    def _held_output(self) -> bytes:
        """While the preface is awaited, what may go to the client: the 400 of an HTTP/1.x
        request, once, or nothing."""
        out, self._http1_answer = self._http1_answer, b""
        return out

    def _replies_over(self) -> str | None:
        """What broke the limit when the replies queued (PING/SETTINGS ACKs, RST_STREAMs) are
        over it (a control frame flood), else None."""
        if self._unsent_replies <= self.limits.max_unsent_replies:
            return None
        return (
            f"{self._unsent_replies} bytes of replies (PING/SETTINGS ACKs, RST_STREAMs) "
            f"queued, over the limit of {self.limits.max_unsent_replies}"
        )

    def _empty_data(self, data: bytes, flow: int) -> str | None:
        """Count a DATA frame of the client's: what broke the limit when too many in a row
        carried nothing (neither data nor padding), else None."""
        if data:
            self._empty_frames = 0
        elif not flow:
            self._empty_frames += 1
            if self._empty_frames > self.limits.max_empty_frames:
                return (
                    f"{self._empty_frames} empty DATA frames in a row, over the limit of "
                    f"{self.limits.max_empty_frames}"
                )
        return None

    def _premature_reset(self, exchange: H2Exchange) -> str | None:
        """Count a stream the client reset before its response, younger than
        ``premature_reset_lifetime``: what broke the limit when such resets are over it and
        half of the streams (rapid reset), else None.

        Envoy's rule (``premature_reset_min_stream_lifetime_seconds``, 1 s): a gRPC client
        cancels a call once it read what it wanted (a watch, a search stopped early) or at its
        deadline, so a reset after the response began, or of a stream that lived a while, is
        an ordinary call's end. Counting those too closed a busy gRPC connection, every other
        call on it failing, after its 101st cancelled stream. An attacker who must keep each
        stream that long before resetting it is held to the concurrent-stream limit."""
        if (
            exchange.first_byte
            or self.clock() - exchange.started >= self.limits.premature_reset_lifetime
        ):
            return None
        self._premature_resets += 1
        if (
            self._premature_resets > self.limits.max_premature_resets
            and 2 * self._premature_resets > self._opened
        ):
            return (
                f"{self._premature_resets} of {self._opened} streams reset before their "
                f"response, over the limit of {self.limits.max_premature_resets} and half of them"
            )
        return None

    def _new_exchange(
        self, headers: Sequence[Header]
    ) -> tuple[H2Exchange, bytes | None, bytes | None]:
        """A new request's exchange (its head as policy and telemetry see it, whether it is a
        gRPC call), the ``x-request-id`` made for it when the client sent none (the caller
        adds it to what it forwards), else None, and its ``:path`` normalized when that
        differs from the one sent, else None (the caller forwards and routes that one).

        Normalized as an HTTP/1.1 target is (``agent.policy.paths.normalized_path``, Istio's
        default and Envoy's for both protocols), where each end first reads the head: a
        route or policy on ``/admin`` also meets ``/%61dmin``, which the pod serves as
        ``/admin``, and the pod is sent the path they saw. Only a path with ``%``, ``\\`` or
        ``/.`` can change, so a gRPC call's ``/pkg.Service/Method`` costs three scans."""
        self._opened += 1
        # One pass over the block (each name's first field counts, as ``header`` finds it):
        # this runs for every request at both ends.
        method = path = authority = host = sent = content_type = None
        regular: list[Header] = []
        for one in headers:
            name = one[0]
            if name[:1] == b":":
                if name == b":path":
                    path = one[1] if path is None else path
                elif name == b":authority":
                    authority = one[1] if authority is None else authority
                elif name == b":method":
                    method = one[1] if method is None else method
                continue
            regular.append((name, one[1]))
            if name == b"content-type":
                content_type = one[1] if content_type is None else content_type
            elif name == b"x-request-id":
                sent = one[1] if sent is None else sent
            elif name == b"host":
                host = one[1] if host is None else host
        request_id = sent if sent is not None else self.new_request_id().encode()
        target = (path or b"").split(b"?", 1)[0].decode("latin-1")
        normal = None
        # Asked of the path's str, as policy asks (``policy_path``): ``in`` on bytes with a
        # bytes needle first tries it as an int, an exception raised and cleared each time
        # (the three cost 5,900 instructions a request at each end so, 650 so: measured).
        if "%" in target or "\\" in target or "/." in target:
            normal = normalized_path(path or b"")
            if normal == path:
                normal = None
            else:
                target = normal.split(b"?", 1)[0].decode("latin-1")
        head = RequestHead(
            (method or b"").decode("latin-1"),
            target,
            (authority or host or b"").decode("latin-1"),
            request_id.decode("latin-1"),
            trace=trace_headers_of(headers),
            headers=regular,
        )
        grpc = (content_type or b"").startswith(b"application/grpc")
        made = None if sent is not None else request_id
        return H2Exchange(head, grpc, self.clock()), made, normal

    def take_completed(self) -> list[H2Exchange]:
        out, self._completed = self._completed, []
        return out

    def take_rejections(self) -> list[str]:
        out, self._rejections = self._rejections, []
        return out

    def _reject(self, cause: str, detail: str) -> None:
        self._rejections.append(cause)
        self.refusal = f"{cause.replace('_', ' ')}: {bounded(detail)}"

    def _fail_client(self, cause: str, code: ErrorCodes, detail: str) -> None:
        """The client broke a limit or the protocol (``detail`` says which, for the log line):
        GOAWAY and close. Each core sends its GOAWAY its own way."""
        raise NotImplementedError

    def _goaway_client(self) -> None:
        """GOAWAY (no error) to the client once, with the last stream taken (``_last_taken``):
        open streams go on. Each core sends it its own way."""
        raise NotImplementedError

    def _check_done(self) -> None:
        """Closing once no stream is left after a GOAWAY either way (each core's streams)."""
        raise NotImplementedError

    def drain(self) -> None:
        """The agent drains (SIGTERM, an upgrade): GOAWAY to the client, so that its next
        requests open a new connection (captured by the next agent) while the open streams
        go on; a stream that crossed the GOAWAY is refused (REFUSED_STREAM: not processed, the
        client retries it, RFC 9113 8.7), and the connection closes once its streams ended.
        Envoy drains its HTTP/2 listeners so. Before, nothing told an HTTP/2 client: its calls
        kept coming to the draining agent until the drain's end cut them."""
        if not self.closing:
            self._goaway_client()
            self._check_done()

    def _crossed_goaway(self, stream_id: int) -> bool:
        """Did the client open ``stream_id`` after our GOAWAY (it must not be processed)?"""
        return self._last_taken is not None and stream_id > self._last_taken

    def _guard(self, data: bytes) -> bool:
        """Feed the client's bytes to the header-block guard before anything parses them:
        False when they broke its limits (the connection is failed); else the header clock
        (``head_started``) follows the block left open."""
        cause = self.guard.feed(data)
        if cause is not None:
            self._fail_client(cause, ErrorCodes.ENHANCE_YOUR_CALM, self.guard.detail)
            return False
        if not self.guard.block_open:
            self.head_started = None
        elif self.head_started is None:
            self.head_started = self.clock()
        return True

    def header_timeout(self) -> None:
        """The shell's timer: a header block stayed open past its deadline (``head_started``)."""
        if not self.closing:
            detail = "a header block not finished within the header timeout"
            self._fail_client(HEADER_TIMEOUT, ErrorCodes.ENHANCE_YOUR_CALM, detail)


def with_path(headers: Sequence[Header], path: bytes) -> list[Header]:
    """``headers`` with ``path`` as the value of their ``:path`` (``_new_exchange``'s)."""
    return [(b":path", path) if h[0] == b":path" else h for h in headers]
