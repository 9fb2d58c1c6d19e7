"""Helpers shared by the CA tests (imported as ``tests.unit.ca.ca_helpers``)."""

from __future__ import annotations

from typing import Any

import grpc

from agent.base import caproto
from agent.ca.inprocess import InProcessCA
from agent.identity.caclient import CA_SERVER_NAME


class RawClient:
    """Sends hand-built requests, so tests can also send what a correct agent never would."""

    def __init__(self, ca: InProcessCA) -> None:
        self.channel = grpc.secure_channel(
            ca.address,
            grpc.ssl_channel_credentials(root_certificates=ca.root_file.read_bytes()),
            options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)],
        )
        self.call = self.channel.unary_unary(
            caproto.METHOD,
            request_serializer=caproto.IstioCertificateRequest.SerializeToString,
            response_deserializer=caproto.IstioCertificateResponse.FromString,
        )

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def create(
        self,
        csr: str,
        *,
        token: str | None,
        impersonate: object = None,
        validity: int = 0,
        extra_metadata: dict[str, Any] | None = None,
    ) -> Any:
        req = caproto.IstioCertificateRequest(csr=csr, validity_duration=validity)
        if impersonate is not None:
            req.metadata.update({caproto.IMPERSONATED_IDENTITY_KEY: impersonate})
        if extra_metadata:
            req.metadata.update(extra_metadata)
        md = (("authorization", f"Bearer {token}"),) if token is not None else ()
        return self.call(req, metadata=md, timeout=10)
