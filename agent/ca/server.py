"""The gRPC shell of the CA: TLS on 15012, one unary method, every decision logged.

All the deciding happens in ``agent.ca.issuer`` and ``agent.ca.auth``; this module only moves
bytes: it decodes the request, pulls the bearer token from the call metadata, and maps outcomes to
gRPC statuses. A thread pool serves calls because signing is CPU work and the Kubernetes mode's
checks are blocking API calls; neither should stall other callers' TLS handshakes.

The serving certificate is issued at start by the CA's own signing certificate, so agents verify
the CA with the same ``root.pem`` that anchors workload certificates. Its SANs always include
``nodemesh-ca`` (the name agents check by default, whatever address they dial) plus any
``--san`` names and the listen address when it is a specific one.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from agent.base import caproto
from agent.ca.auth import Authenticator, bearer_token
from agent.ca.authority import Authority, key_pem
from agent.ca.issuer import Issuer, Rejected
from agent.ca.kube import KubeApiError
from agent.ca.metrics import REQUEST_UNREAD, TOO_MANY_CALLS, CaMetrics
from agent.identity.caclient import CA_SERVER_NAME
from agent.identity.keysmith import to_pem

log = logging.getLogger(__name__)

SERVING_CERT_TTL = dt.timedelta(days=365)
# What a caller can make the CA hold before anything is authenticated (the token is checked by
# the handler, after the request was read): grpcio reads requests of up to 4 MiB and queues
# calls past the thread pool without limit. A request is a CSR (at most ``MAX_CSR_BYTES``,
# 16 KiB), a duration and a little metadata: larger ones are refused by grpcio before they are
# read (RESOURCE_EXHAUSTED), and so are calls past ``MAX_CONCURRENT_RPCS`` at once (agents
# retry with backoff, as for any failure); ``RefusalCounter`` counts both.
MAX_REQUEST_BYTES = 64 * 1024
MAX_CONCURRENT_RPCS = 256


class CertificateService:
    """The ``IstioCertificateService`` implementation."""

    def __init__(
        self, issuer: Issuer, authenticator: Authenticator, metrics: CaMetrics | None = None
    ) -> None:
        self._issuer = issuer
        self._authenticator = authenticator
        self._metrics = metrics

    @property
    def metrics(self) -> CaMetrics | None:
        return self._metrics

    def create_certificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._metrics is None:
            return self._decide(request, context, lambda _code: None)
        with self._metrics.deciding() as report:
            return self._decide(request, context, report)

    def _decide(
        self,
        request: Any,
        context: grpc.ServicerContext,
        report: Callable[[grpc.StatusCode | None], None],
    ) -> Any:
        peer = context.peer()
        try:
            caller = self._authenticator.authenticate(
                bearer_token(context.invocation_metadata() or ())
            )
            issued = self._issuer.issue(
                caller=caller,
                csr_pem=request.csr,
                validity_seconds=request.validity_duration,
                metadata=caproto.request_metadata(request),
            )
        except Rejected as e:
            if e.code == grpc.StatusCode.UNAUTHENTICATED:
                log.warning("refused %s: UNAUTHENTICATED: %s", peer, e.message)
            report(e.code)
            context.abort(e.code, e.message)
        except KubeApiError as e:
            log.error("cannot decide the request from %s: %s", peer, e)
            report(grpc.StatusCode.UNAVAILABLE)
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        report(None)
        return caproto.IstioCertificateResponse(
            cert_chain=issued.cert_chain, root_cert=caproto.Roots(ca_cert=issued.root_certs)
        )

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(
            self.create_certificate,
            request_deserializer=caproto.IstioCertificateRequest.FromString,
            response_serializer=caproto.IstioCertificateResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(caproto.SERVICE, {"CreateCertificate": method})


class _CountingPool(ThreadPoolExecutor):
    """The server's pool, counting the calls submitted and not finished: the number grpcio
    compares with ``maximum_concurrent_rpcs`` (it submits exactly the calls it accepts, and
    counts one finished in the future's callback, which runs after this pool's own)."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="ca-rpc")
        self._lock = threading.Lock()
        self.active = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            self.active += 1
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: Future[Any]) -> None:
        with self._lock:
            self.active -= 1


class RefusalCounter(grpc.ServerInterceptor):
    """Counts the calls grpcio refuses before the handler runs, which it reports to no hook.

    - Past ``limit`` calls at once: grpcio calls the interceptors of every call (under its
      lock, before it compares its count of calls in progress with the limit), so a call
      seen while ``pool.active`` is at the limit is one grpcio refuses. The pool's count
      drops just before grpcio's, so a call refused in that instant goes uncounted; none is
      counted that grpcio served.
    - A request over ``MAX_REQUEST_BYTES``: refused by grpcio's core after the call was
      accepted, so the handler's method never runs. The handler is served as a request stream
      whose first read fails or ends instead; that also happens when the caller left before
      sending its request, which grpcio does not tell apart (``REQUEST_UNREAD``). Its core
      does (the read of an oversized request fails; a departed caller's ends empty), but the
      server's request iterator turns both into one end of the stream, and which exception it
      raises (``StopIteration`` or ``RpcError``) follows the order in which two core events are
      handled, not the cause: of 300 oversized requests sent one after another, 245 raised
      ``RpcError``, as a cancelled call does (grpcio 1.85). Hence one outcome, not two that
      would count wrongly.
    """

    def __init__(self, metrics: CaMetrics, pool: _CountingPool, limit: int) -> None:
        self._metrics = metrics
        self._pool = pool
        self._limit = limit

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        if self._pool.active >= self._limit:
            self._metrics.refused(TOO_MANY_CALLS)
            return handler
        behaviour = handler.unary_unary
        metrics = self._metrics

        def first_request(requests: Any, context: grpc.ServicerContext) -> Any:
            try:
                request = next(requests)
            except (StopIteration, grpc.RpcError):
                metrics.refused(REQUEST_UNREAD)
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"no request read: larger than {MAX_REQUEST_BYTES} bytes, or none sent",
                )
            return behaviour(request, context)

        return grpc.stream_unary_rpc_method_handler(
            first_request,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def serving_credentials(authority: Authority, names: Sequence[str]) -> grpc.ServerCredentials:
    """TLS credentials for the CA itself; the key stays in this process's memory."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = authority.sign_server(key.public_key(), names, SERVING_CERT_TTL)
    chain = [cert]
    if authority.signing_cert not in authority.roots:
        chain.append(authority.signing_cert)
    chain.extend(authority.signing_chain)
    return grpc.ssl_server_credentials([(key_pem(key), to_pem(chain).encode())])


def serving_names(listen: str, extra: Sequence[str]) -> list[str]:
    host = listen.rpartition(":")[0].strip("[]")
    names = [CA_SERVER_NAME, "localhost", "127.0.0.1", *extra]
    if host and host not in ("0.0.0.0", "::"):
        names.append(host)
    return list(dict.fromkeys(names))


def start_server(
    service: CertificateService,
    authority: Authority,
    *,
    listen: str,
    sans: Sequence[str] = (),
    workers: int = 8,
    max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the bound port (useful with ``:0``)."""
    pool = _CountingPool(workers)
    metrics = service.metrics
    counter = [] if metrics is None else [RefusalCounter(metrics, pool, max_concurrent_rpcs)]
    server = grpc.server(
        pool,
        handlers=[service.handler()],
        interceptors=counter,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    port = server.add_secure_port(
        listen, serving_credentials(authority, serving_names(listen, sans))
    )
    if port == 0:
        raise OSError(f"cannot listen on {listen}: the address is in use or not local")
    server.start()
    log.info("mesh CA serving istio.v1.auth.IstioCertificateService on %s (port %d)", listen, port)
    return server, port
