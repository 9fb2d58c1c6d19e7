"""SPIFFE IDs as Istio and nodemesh use them: ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.

Parsing is strict because an identity string crosses trust boundaries (a CSR, a CA request's
metadata, a peer certificate): anything that is not exactly this shape is refused rather than
normalised, so two components can never disagree about who a string names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# DNS-1123 labels for namespace and service account, as Kubernetes allows them; a trust domain
# is a lowercase DNS name (SPIFFE spec: letters, digits, '.', '-', '_').
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = rf"{_LABEL}(\.{_LABEL})*"
# Used with ``fullmatch`` only: ``re.match`` with ``$`` also accepts a trailing newline, and an
# identity with a newline in it would be a different string naming "the same" workload.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_NAME = re.compile(_SUBDOMAIN)


def valid_trust_domain(text: str) -> bool:
    """Whether ``text`` is a trust domain an identity may name (``SpiffeId.parse`` checks the
    same)."""
    return _TRUST_DOMAIN.fullmatch(text) is not None


class SpiffeIdError(ValueError):
    """A string is not a SPIFFE ID of the form ``spiffe://<td>/ns/<namespace>/sa/<account>``."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        prefix = "spiffe://"
        if not text.startswith(prefix):
            raise SpiffeIdError(f"{text!r} is not a SPIFFE ID: it must start with {prefix!r}")
        parts = text[len(prefix) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise SpiffeIdError(
                f"{text!r} is not a workload SPIFFE ID: expected "
                "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )
        td, _, ns, _, sa = parts
        if not _TRUST_DOMAIN.fullmatch(td):
            raise SpiffeIdError(f"{text!r}: trust domain {td!r} is not a lowercase DNS name")
        for what, value in (("namespace", ns), ("service account", sa)):
            if len(value) > 253 or not _NAME.fullmatch(value):
                raise SpiffeIdError(f"{text!r}: {what} {value!r} is not a valid Kubernetes name")
        return cls(td, ns, sa)
