"""The agent's client of the mesh CA (Istio's ``IstioCertificateService`` over gRPC/TLS).

For each request it has a fresh ECDSA P-256 key made in memory (by the key child,
``agent.identity.keys``: the agent itself never imports ``cryptography``), sends a CSR with the
identity as its only SAN and the identity again as ``ImpersonatedIdentity`` metadata (how Istio node
proxies ask on a workload's behalf), and checks the answer before anyone can present it.

The call is gRPC without grpcio: ``agent.identity.grpcunary`` (the HTTP/2 exchange, sans-IO) and
``agent.base.cawire`` (the messages), on an asyncio TLS connection; the long-running agent never
imports grpc or protobuf (ARCHITECTURE.md, "No compiler in the agent"). Each request opens its
own connection and closes it after the answer: requests come a few times a day per identity,
so a kept connection would save a TLS handshake now and then (about 3 ms on loopback, measured
with ``tests/bench/ca/bench_ca_issuance.py``) at the price of reconnect logic.
The TLS check is the one grpcio made: the CA's certificate must chain to ``--ca-root`` and name
``--ca-server-name`` (sent as SNI too), and the connection must negotiate ``h2`` by ALPN.

Why the root and the token are re-read rather than fixed at start: the CA's root (``--ca-root``)
changes during a root rotation, and Kubernetes rotates projected service-account tokens (about
hourly). Both files are re-read when their inode, mtime or size changes, so a long-running agent
follows them without a restart: the next connection uses the new root.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from agent.base import cawire
from agent.identity.certs import CertificateError, WorkloadCertificate
from agent.identity.grpcunary import CallError, Status, UnaryCall
from agent.identity.keys import KeyChild, KeyChildError
from agent.identity.spiffe import SpiffeId

log = logging.getLogger(__name__)

CA_SERVER_NAME = "nodemesh-ca"
_TRANSPORT_FAILURES = {Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED}


class CaError(Exception):
    """A certificate request failed; ``code`` is the gRPC status (``None`` for local errors)."""

    def __init__(self, message: str, code: Status | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def cause(self) -> str:
        """A short cause for readiness and status: ``CA unreachable`` for transport failures,
        ``CA refused (<gRPC status>)`` for an answer, ``certificate request failed`` else."""
        if self.code in _TRANSPORT_FAILURES:
            return "CA unreachable"
        if self.code is not None:
            return f"CA refused ({self.code.name})"
        return "certificate request failed"


@dataclass
class _Watched:
    """File content re-read when its (inode, mtime, size) changes: an in-place write, a rename
    over it, or the kubelet's symlink swap of a projected volume."""

    path: Path
    stamp: tuple[int, int, int] | None = None
    data: bytes = b""

    def read(self) -> tuple[bytes, bool]:
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            changed = stamp != self.stamp
            if changed:
                self.data = self.path.read_bytes()
                self.stamp = stamp
        except OSError as e:
            raise CaError(f"cannot read {self.path}: {e.strerror}; check the agent's flags") from e
        return self.data, changed


class CaClient:
    """Fetch workload certificates from the CA at ``address`` (``host:port``)."""

    def __init__(
        self,
        address: str,
        *,
        root_file: Path,
        token_file: Path,
        server_name: str = CA_SERVER_NAME,
        validity_seconds: int = 0,
        timeout: float = 10.0,
        keys: KeyChild | None = None,
    ) -> None:
        self.address = address
        self._keys = keys or KeyChild()
        self._root = _Watched(root_file)
        self._token = _Watched(token_file)
        self._server_name = server_name
        self._validity = validity_seconds
        self._timeout = timeout
        self._context: ssl.SSLContext | None = None
        self._in_flight: set[asyncio.Future[bytes]] = set()

    def _tls(self) -> ssl.SSLContext:
        root, changed = self._root.read()
        if self._context is not None and not changed:
            return self._context
        if self._context is not None:
            log.info(
                "CA root file %s changed; new connections to %s use it",
                self._root.path,
                self.address,
            )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
        try:
            context.load_verify_locations(cadata=root.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as e:
            raise CaError(
                f"the CA root file {self._root.path} holds no usable PEM certificate ({e}); "
                "check --ca-root"
            ) from e
        self._context = context
        return context

    def _token_value(self) -> str:
        data, changed = self._token.read()
        token = data.decode("utf-8", "replace").strip()
        if not token:
            raise CaError(f"the token file {self._token.path} is empty")
        if changed:
            log.info("using the token in %s (re-read after a change)", self._token.path)
        return token

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        try:
            key, csr = await self._keys.new_key(identity)
        except KeyChildError as e:
            raise CaError(str(e)) from e
        message = cawire.encode_request(
            csr,
            self._validity,
            {cawire.IMPERSONATED_IDENTITY_KEY: str(identity)},
        )
        call = UnaryCall(
            authority=self.address,
            path=cawire.METHOD,
            message=message,
            timeout=self._timeout,
            metadata=(("authorization", f"Bearer {self._token_value()}"),),
        )
        exchange = asyncio.ensure_future(self._exchange(call, self._tls()))
        self._in_flight.add(exchange)
        try:
            async with asyncio.timeout(self._timeout):
                answer = await exchange
        except TimeoutError as e:
            raise self._failed(
                identity, CallError(Status.DEADLINE_EXCEEDED, f"no answer within {self._timeout}s")
            ) from e
        except CallError as e:
            raise self._failed(identity, e) from e
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller is being cancelled
            # close() cut the exchange. Left as a CancelledError it would end the identity
            # manager's worker for good instead of being a failed attempt that is retried.
            raise CaError(
                f"certificate request for {identity} to the CA at {self.address} was cut: the "
                "client was closed under it; retrying",
                Status.UNAVAILABLE,
            ) from e
        finally:
            self._in_flight.discard(exchange)
        try:
            response = cawire.decode_response(answer)
        except cawire.WireError as e:
            raise CaError(
                f"unusable answer from the CA at {self.address}: not a certificate response ({e})",
                Status.INTERNAL,
            ) from e
        try:
            return WorkloadCertificate.from_response(
                identity, key, response.cert_chain, response.root_certs
            )
        except CertificateError as e:
            raise CaError(f"unusable answer from the CA at {self.address}: {e}") from e

    def _failed(self, identity: SpiffeId, e: CallError) -> CaError:
        hint = ""
        if e.status in _TRANSPORT_FAILURES:
            hint = " (is the CA running and reachable from this node? check --ca-address)"
        return CaError(
            f"certificate request for {identity} to the CA at {self.address} failed: "
            f"{e.status.name}: {e.details}{hint}",
            e.status,
        )

    async def _exchange(self, call: UnaryCall, context: ssl.SSLContext) -> bytes:
        """One connection, one call: raises ``CallError`` for every failure, the transport's
        included (as ``UNAVAILABLE``, which is what grpcio reported for them)."""
        host, _, port = self.address.rpartition(":")
        try:
            reader, writer = await asyncio.open_connection(
                host.strip("[]"), int(port), ssl=context, server_hostname=self._server_name
            )
        except ssl.SSLError as e:
            raise CallError(
                Status.UNAVAILABLE,
                f"TLS handshake with the CA failed: {e.reason or e} (its certificate must chain to "
                f"--ca-root {self._root.path} and name --ca-server-name {self._server_name})",
            ) from e
        except (OSError, ValueError) as e:
            raise CallError(Status.UNAVAILABLE, f"cannot connect: {e}") from e
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                raise CallError(Status.UNAVAILABLE, "the CA did not agree to HTTP/2 (ALPN h2)")
            writer.write(call.start())
            while not call.done:
                try:
                    data = await reader.read(65536)
                except OSError as e:
                    call.connection_lost(str(e))
                    break
                if not data:
                    call.connection_lost("the connection was closed")
                    break
                if reply := call.receive(data):
                    writer.write(reply)
            return call.result()
        finally:
            writer.close()

    async def close(self) -> None:
        """Cut the requests in flight (their connections close): they fail as ``UNAVAILABLE``,
        a failure the identity manager retries, never a cancellation of its worker."""
        for exchange in list(self._in_flight):
            exchange.cancel()
        await self._keys.close()
