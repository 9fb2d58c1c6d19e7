"""The hand-built descriptors are byte-compatible with Istio's ca.proto compiled by protoc."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from agent.base import caproto

# Istio's security/v1alpha1/ca.proto (istio/api), messages and service only.
ISTIO_CA_PROTO = """
syntax = "proto3";
import "google/protobuf/struct.proto";
package istio.v1.auth;
message IstioCertificateRequest {
  string csr = 1;
  int64 validity_duration = 3;
  google.protobuf.Struct metadata = 4;
}
message IstioCertificateResponse {
  repeated string cert_chain = 1;
  Roots root_cert = 2;
}
message Roots { repeated string ca_cert = 1; }
service IstioCertificateService {
  rpc CreateCertificate(IstioCertificateRequest) returns (IstioCertificateResponse) {}
}
"""


def test_wire_bytes_match_protoc_output(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (dev extra) absent")
    include = Path(importlib.import_module("grpc_tools").__file__).parent / "_proto"  # type: ignore[arg-type]
    (tmp_path / "istio_ca.proto").write_text(ISTIO_CA_PROTO)
    rc = protoc.main(
        ["protoc", f"-I{tmp_path}", f"-I{include}", f"--python_out={tmp_path}", "istio_ca.proto"]
    )
    assert rc == 0
    sys.path.insert(0, str(tmp_path))
    try:
        ref = importlib.import_module("istio_ca_pb2")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("istio_ca_pb2", None)

    ours = caproto.IstioCertificateRequest(csr="CSR", validity_duration=3600)
    ours.metadata.fields[caproto.IMPERSONATED_IDENTITY_KEY].string_value = "spiffe://td/ns/a/sa/b"
    theirs = ref.IstioCertificateRequest(csr="CSR", validity_duration=3600)
    theirs.metadata.update({"ImpersonatedIdentity": "spiffe://td/ns/a/sa/b"})
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )

    resp = ref.IstioCertificateResponse(cert_chain=["leaf", "root"])
    resp.root_cert.ca_cert.extend(["root", "old-root"])
    decoded = caproto.IstioCertificateResponse.FromString(resp.SerializeToString())
    assert list(decoded.cert_chain) == ["leaf", "root"]
    assert list(decoded.root_cert.ca_cert) == ["root", "old-root"]
    assert ref.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name == caproto.SERVICE
