"""The agent's client of the mesh CA (Istio's ``IstioCertificateService`` over gRPC/TLS).

For each request it generates a fresh ECDSA P-256 key in memory, sends a CSR with the identity
as its only SAN and the identity again as ``ImpersonatedIdentity`` metadata (how Istio node
proxies ask on a workload's behalf), and checks the answer before anyone can present it.

Why the channel and the token are re-read rather than fixed at start: the CA's root (``--ca-root``)
changes during a root rotation, and Kubernetes rotates projected service-account tokens (about
hourly). The token file is re-read when its inode, mtime or size changes and the channel is
rebuilt when the root file changes or after a transport failure, so a long-running agent follows
both without a restart. gRPC itself reconnects a broken channel; a rebuild is the fallback.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from agent.base import caproto
from agent.identity.certs import CertificateError, WorkloadCertificate, build_csr, generate_key
from agent.identity.spiffe import SpiffeId

log = logging.getLogger(__name__)

CA_SERVER_NAME = "nodemesh-ca"
_TRANSPORT_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class CaError(Exception):
    """A certificate request failed; ``code`` is the gRPC status (``None`` for local errors)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
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
    ) -> None:
        self.address = address
        self._root = _Watched(root_file)
        self._token = _Watched(token_file)
        self._server_name = server_name
        self._validity = validity_seconds
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    async def _current_channel(self) -> grpc.aio.Channel:
        root, changed = self._root.read()
        if self._channel is not None and changed:
            log.info("CA root file %s changed; reconnecting to %s", self._root.path, self.address)
            # Calls still in flight on the old channel are cancelled and retried by the identity
            # manager; a root change is rare enough for that to be cheap.
            await self._drop(self._channel)
        if self._channel is None:
            self._channel = grpc.aio.secure_channel(
                self.address,
                grpc.ssl_channel_credentials(root_certificates=root),
                options=[("grpc.ssl_target_name_override", self._server_name)],
            )
        return self._channel

    @staticmethod
    def _method(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
        return channel.unary_unary(
            caproto.METHOD,
            request_serializer=caproto.IstioCertificateRequest.SerializeToString,
            response_deserializer=caproto.IstioCertificateResponse.FromString,
        )

    def _token_value(self) -> str:
        data, changed = self._token.read()
        token = data.decode("utf-8", "replace").strip()
        if not token:
            raise CaError(f"the token file {self._token.path} is empty")
        if changed:
            log.info("using the token in %s (re-read after a change)", self._token.path)
        return token

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        key = generate_key()
        request = caproto.IstioCertificateRequest(
            csr=build_csr(identity, key), validity_duration=self._validity
        )
        request.metadata.fields[caproto.IMPERSONATED_IDENTITY_KEY].string_value = str(identity)
        channel = await self._current_channel()
        try:
            response = await self._method(channel)(
                request,
                metadata=(("authorization", f"Bearer {self._token_value()}"),),
                timeout=self._timeout,
            )
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller is being cancelled
            # grpc.aio raises CancelledError when the channel is closed under a call: another
            # request dropped it after a transport failure, or --ca-root changed. Left as is, it
            # would end the identity manager's worker for good instead of being retried.
            # A transport failure of the channel it shared: reported as one (``CA unreachable``),
            # not as a local error, whichever of the concurrent requests saw the failure first.
            raise CaError(
                f"certificate request for {identity} to the CA at {self.address} was cut: its "
                "channel was closed (after a transport failure or a --ca-root change); retrying",
                grpc.StatusCode.UNAVAILABLE,
            ) from e
        except grpc.aio.AioRpcError as e:
            hint = ""
            if e.code() in _TRANSPORT_FAILURES:
                await self._drop(channel)
                hint = " (is the CA running and reachable from this node? check --ca-address)"
            raise CaError(
                f"certificate request for {identity} to the CA at {self.address} failed: "
                f"{e.code().name}: {e.details()}{hint}",
                e.code(),
            ) from e
        try:
            return WorkloadCertificate.from_response(
                identity, key, list(response.cert_chain), list(response.root_cert.ca_cert)
            )
        except CertificateError as e:
            raise CaError(f"unusable answer from the CA at {self.address}: {e}") from e

    async def _drop(self, channel: grpc.aio.Channel) -> None:
        """Close ``channel``; the next request opens a new one. Only the current channel is
        forgotten, so a failure seen on an old one never closes its replacement."""
        if self._channel is channel:
            self._channel = None
        await channel.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._drop(self._channel)
