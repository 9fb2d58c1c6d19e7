"""The wire contract of Istio's CA: ``istio.v1.auth.IstioCertificateService/CreateCertificate``.

Istio's ``security/v1alpha1/ca.proto`` (package ``istio.v1.auth``)::

    message IstioCertificateRequest  { string csr = 1; int64 validity_duration = 3;
                                       google.protobuf.Struct metadata = 4; }
    message IstioCertificateResponse { repeated string cert_chain = 1; Roots root_cert = 2; }
    message Roots                    { repeated string ca_cert = 1; }
    service IstioCertificateService  { rpc CreateCertificate(IstioCertificateRequest)
                                           returns (IstioCertificateResponse); }

Field 2 of the request (``subject_id``) was removed upstream and is left unused here too. Istio
node proxies (ztunnel) put the identity they ask for *on behalf of a workload* into
``metadata`` under the key ``ImpersonatedIdentity``.

Why the descriptors are built here at import time instead of generated with ``grpcio-tools``:
generated ``_pb2`` modules pin the protobuf runtime version they were generated for, and the
runtime must not need the generator. Building the ``FileDescriptorProto`` by hand keeps the exact
field numbers visible in one place and works with every protobuf runtime the project allows.

Only the CA server (and tests) use these classes; the agent's CA client writes and reads the same
messages with ``agent.base.cawire``, which holds the names below and is tested against this module.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

from agent.base.cawire import IMPERSONATED_IDENTITY_KEY as IMPERSONATED_IDENTITY_KEY
from agent.base.cawire import METHOD as METHOD
from agent.base.cawire import PACKAGE
from agent.base.cawire import SERVICE as SERVICE

_F = descriptor_pb2.FieldDescriptorProto


def _field(
    message: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    kind: int,
    *,
    repeated: bool = False,
    type_name: str = "",
) -> None:
    f = message.field.add()
    f.name = name
    f.number = number
    f.type = kind
    f.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    f.json_name = "".join(p.capitalize() if i else p for i, p in enumerate(name.split("_")))
    if type_name:
        f.type_name = type_name


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    fd.name = "security/v1alpha1/ca.proto"
    fd.package = PACKAGE
    fd.syntax = "proto3"
    fd.dependency.append("google/protobuf/struct.proto")

    req = fd.message_type.add()
    req.name = "IstioCertificateRequest"
    _field(req, "csr", 1, _F.TYPE_STRING)
    _field(req, "validity_duration", 3, _F.TYPE_INT64)
    _field(req, "metadata", 4, _F.TYPE_MESSAGE, type_name=".google.protobuf.Struct")

    resp = fd.message_type.add()
    resp.name = "IstioCertificateResponse"
    _field(resp, "cert_chain", 1, _F.TYPE_STRING, repeated=True)
    _field(resp, "root_cert", 2, _F.TYPE_MESSAGE, type_name=f".{PACKAGE}.Roots")

    roots = fd.message_type.add()
    roots.name = "Roots"
    _field(roots, "ca_cert", 1, _F.TYPE_STRING, repeated=True)

    svc = fd.service.add()
    svc.name = "IstioCertificateService"
    method = svc.method.add()
    method.name = "CreateCertificate"
    method.input_type = f".{PACKAGE}.IstioCertificateRequest"
    method.output_type = f".{PACKAGE}.IstioCertificateResponse"
    return fd


def _build() -> tuple[Any, Any, Any]:
    pool = descriptor_pool.DescriptorPool()
    struct_fd = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(struct_fd)
    pool.Add(struct_fd)
    pool.Add(_file_descriptor())
    classes = [
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in ("IstioCertificateRequest", "IstioCertificateResponse", "Roots")
    ]
    return classes[0], classes[1], classes[2]


# Message classes; typed as Any because they are created at run time.
IstioCertificateRequest, IstioCertificateResponse, Roots = _build()


def request_metadata(request: Any) -> dict[str, object]:
    """The request's ``metadata`` Struct as a plain dict (empty when absent)."""
    if not request.HasField("metadata"):
        return {}
    fields = request.metadata.fields
    out: dict[str, object] = {}
    for key in fields:
        value = fields[key]
        kind = value.WhichOneof("kind")
        out[key] = getattr(value, kind) if kind else None
    return out
