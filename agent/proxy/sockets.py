"""Upstream sockets: marked so capture skips them, and optionally sourced from the client's IP.

``SO_MARK`` (``PROXY_MARK``) on every socket the proxy opens lets the capture programs recognise
(and pass) the proxy's own traffic, so the proxy never captures itself. ``IP_TRANSPARENT`` lets
a socket bind to an address the node does not own: the proxy connects to a local pod *as* the
client pod (its IP as source), so the server sees who really called. The pod's replies to that
foreign address are steered back to this socket by the datapath (the pod-ingress program hands
any segment of a flow the node owns to its socket).

``IP_BIND_ADDRESS_NO_PORT`` on such a socket: ``bind((client_ip, 0))`` alone would pick the port
at bind time for the address alone, searching the range for a port that no socket on that
address holds, TIME_WAIT ones included; the proxy closes first towards the pod, so it holds
thousands of them under a connection load, and the search grew to most of the destination
agent's CPU per connection (and fails once the range is full). With the option the port is
chosen by ``connect``, unique per (source, destination) pair as for any client socket.

``TCP_NOTSENT_LOWAT`` (``UNSENT_LOWAT``) on every socket the proxy writes to (``limit_unsent``):
the bytes the agent has written into a socket but TCP has not sent yet are kernel memory charged
to the agent, and nothing of the agent's budgets counted them. With send-buffer autotuning
(``tcp_wmem``'s maximum, 4 MiB by default) a socket toward a pod that read fast and then stopped,
or toward a peer agent that does not read, held up to that maximum unsent, per connection. With
the option the kernel takes no new segment while that many bytes are unsent (``tcp_sendmsg``
asks ``sk_stream_memory_free``, which checks the unsent bytes against it) and polls writable
only below half of it, so a write it refuses stays in user space, where the relay's one pending
read, the HBONE queue budget and the stream windows already count and bound it. It bounds only
what is unsent: bytes in flight are bounded by the peer's receive window as before, so a long
fat path still fills its window.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket

from agent.base.accepted import abort as abort  # re-exported: the relays call sockets.abort
from agent.base.accepted import peer_of

# What one socket may hold written but unsent, beyond the segment being filled (at most the
# device's GSO size, 64 KiB without BIG TCP). Twice a relay read (``relay.MAX_CHUNK``): a socket
# polls writable below half of it, so one that did takes a whole read. The
# measurements behind the value: docs/performance/bulk-and-windows.md, "Kernel send queues".
UNSENT_LOWAT = 512 * 1024


def upstream_socket(mark: int, source_ip: str | None = None) -> socket.socket:
    """A non-blocking socket for the proxy's side of an upstream connection. Made non-blocking
    by ``socket`` itself (``SOCK_NONBLOCK``): ``setblocking(False)`` afterwards was one more
    system call (``ioctl(FIONBIO)``) per connection."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        limit_unsent(sock)
        if source_ip is not None:
            sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
    except OSError:
        sock.close()
        raise
    return sock


async def connect(
    address: tuple[str, int],
    *,
    mark: int,
    timeout: float,
    source_ip: str | None = None,
    hold_reader: bool = False,
    loop: asyncio.AbstractEventLoop | None = None,
) -> socket.socket:
    """A connected, non-blocking upstream socket; raises OSError or TimeoutError. ``loop``:
    the running loop, when the caller has it at hand (looking it up is a ``getpid`` system
    call on Python 3.11).

    ``address`` is numeric (an IP and a port). Not ``loop.sock_connect``: uvloop's resolves
    every address with ``getaddrinfo`` in libuv's thread pool first (it passes no socket type,
    so its numeric fast path does not apply): per proxied connection a future, a worker
    thread woken and the loop woken back through its eventfd, before the ``connect`` call. Nor
    ``asyncio.timeout``/``wait_for`` around it: a timer handle on the waiter does the same
    with no task (``wait_for`` made one in Python 3.11) and no context manager. The connect
    runs in the caller's task: ``connect`` itself, then (when it is still in progress, see
    below) one writer until the socket is writable, then its ``SO_ERROR``.

    *Finished within the call*: to a listener on this host (a pod of this node, behind its
    veth, or on loopback) the kernel runs the whole handshake inside ``connect``: the SYN is
    delivered and answered in the softirq the send raises, and the SYN-ACK, queued while the
    call held the socket, is processed when it lets go of it. ``connect`` answers EINPROGRESS
    all the same, so it is asked once more (``_asked_again``): connected (0), refused, or
    EALREADY while the handshake is still under way (a peer on another host, a SYN the pod's
    full queue dropped). Only then does the connect wait, as below: the pod connect of every
    cross-node and same-node connection used to register a writer, arm the timeout's timer,
    swap in the placeholder reader and suspend its task for a pass of the loop, each time.

    ``hold_reader`` (for a connect that had to wait): the caller puts a reader on the socket
    before it next awaits (a relay). The connect's writer is then swapped for a placeholder
    reader rather than removed, so uvloop keeps the descriptor's poll handle for the relay's
    reader: making and closing one is an ``ioctl`` and about seven ``epoll_ctl`` calls. The
    caller replaces the placeholder (``add_reader``) or drops it (``release``) before it
    closes the socket; should the loop poll first, the placeholder removes itself. A connect
    finished within the call holds nothing: the relay's reader makes the only poll handle,
    and ``release`` finds nothing to drop."""
    sock = upstream_socket(mark, source_ip)
    try:
        err = sock.connect_ex(address)
        if err in _IN_PROGRESS:
            err = _asked_again(sock, address)
            if err in _STILL_IN_PROGRESS:
                err = await _finished(sock, timeout, hold_reader, loop)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EINTR})
# What asking again answers while the handshake is under way (EALREADY; the other two
# should the call be interrupted or the kernel answer as for a first connect).
_STILL_IN_PROGRESS = frozenset({errno.EALREADY, errno.EINPROGRESS, errno.EINTR})


def _asked_again(sock: socket.socket, address: tuple[str, int]) -> int:
    """``connect`` again on a socket whose connect is in progress: 0 once it is connected,
    EALREADY while the handshake is under way, the connect's error (ECONNREFUSED, ...) once
    it failed (the kernel reports and clears it, as ``SO_ERROR`` would). One system call,
    where waiting costs a writer, a timer and a pass of the loop."""
    return sock.connect_ex(address)


async def _finished(
    sock: socket.socket,
    timeout: float,
    hold_reader: bool,
    loop: asyncio.AbstractEventLoop | None,
) -> int:
    """Wait for an in-progress connect to end: its error (0: connected), or TimeoutError."""
    if loop is None:
        loop = asyncio.get_running_loop()
    fd = sock.fileno()
    waiter: asyncio.Future[bool] = loop.create_future()
    loop.add_writer(fd, _wake, waiter, True)
    timer = loop.call_later(timeout, _wake, waiter, False)
    try:
        if not await waiter:
            raise TimeoutError(f"connect did not finish in {timeout:g}s")
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err and hold_reader:
            loop.add_reader(fd, _unclaimed, loop, fd)  # before the writer goes: see ``connect``
    finally:
        timer.cancel()
        loop.remove_writer(fd)
    return err


def _wake(waiter: asyncio.Future[bool], writable: bool) -> None:
    if not waiter.done():
        waiter.set_result(writable)


def _unclaimed(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """A held reader nobody took over before the loop polled: step aside (the bytes wait in
    the socket for whoever reads it next)."""
    loop.remove_reader(fd)


def release(sock: socket.socket) -> None:
    """Close a socket ``connect(hold_reader=True)`` returned, dropping its held reader (if a
    relay took it over and has ended, or the connect finished within its call, there is none
    left: nothing to drop)."""
    asyncio.get_running_loop().remove_reader(sock.fileno())
    sock.close()


def unpoll(sock: socket.socket, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Drop whatever reader and writer ``sock`` has on the loop, before it is closed on a
    failure path: a held reader (``connect(hold_reader=True)``), or what a relay that failed
    half-made put there (uvloop must not poll a closed descriptor). ``loop``: the running
    loop, when the caller has it."""
    fd = sock.fileno()
    if fd >= 0:
        if loop is None:
            loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        loop.remove_writer(fd)


def captured_addresses(
    client: socket.socket, original_dst: tuple[str, int] | None = None
) -> tuple[str, int, str, int] | None:
    """(source ip, source port, original destination ip, port) of a captured connection: the
    source is what ``accept`` returned (``peer_of``), the destination ``getsockname()``, since
    capture assigned the SYN to our listener without rewriting it (``original_dst`` overrides
    it in tests). ``None`` when the kernel no longer knows the socket's addresses; the socket
    is then closed."""
    try:
        src_ip, src_port = peer_of(client)[:2]
        dst_ip, dst_port = original_dst or client.getsockname()[:2]
    except OSError:
        client.close()
        return None
    return src_ip, src_port, dst_ip, dst_port


def nodelay(sock: socket.socket) -> None:
    """No Nagle on an accepted socket: the proxy forwards what it reads at once, and a 1 KB
    response held back waiting for an ACK would add a round trip to every request."""
    try:  # noqa: SIM105 (``contextlib.suppress`` is three calls more per connection)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def accepted(sock: socket.socket) -> None:
    """The options of every socket a proxy listener accepted (``ProxyComponent.handle``), as
    ``upstream_socket`` sets them on the sockets the proxy opens: no Nagle, and a bound on
    what its send queue holds unsent."""
    nodelay(sock)
    limit_unsent(sock)


def limit_unsent(sock: socket.socket) -> None:
    """Bound what ``sock``'s kernel send queue holds unsent to ``UNSENT_LOWAT`` (plus the
    segment being filled): see the module's docstring. Called for every socket the proxy
    writes to: the ones it opens (``upstream_socket``: pods, peer agents' HBONE) and the ones
    its listeners accepted (``accepted``)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_LOWAT)


def keepalive(sock: socket.socket, *, idle: int = 60, interval: int = 10, count: int = 3) -> None:
    """TCP keepalive on an HBONE connection's socket. The client side also PINGs over HTTP/2;
    the server side has only this to notice a peer node that vanished without a FIN, so its
    tunnels (and their pod connections) do not stay open forever."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


def disown(sock: socket.socket) -> None:
    """Forget a socket handed to the event loop whose transport setup failed.

    Once ``create_connection(sock=...)`` or ``connect_accepted_socket`` has the socket, the loop
    owns its descriptor and closes it on failure; uvloop does so *without* detaching the Python
    object, so ``sock.close()`` (or garbage collection) would close the number a second time, by
    then possibly reused by an unrelated socket. ``detach`` drops it without closing.
    """
    sock.detach()
