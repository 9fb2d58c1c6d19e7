"""What the agent's main process and its workers say to each other, as bytes (sans-IO).

One ``socketpair`` per worker carries everything: the agent's configuration and state going
down, certificate requests going up and answers coming down, and the main process's questions
for the admin API and ``/metrics`` (``Call``/``Reply`` pairs matched by ``id``, in either
direction) plus one-way ``Note``s. A frame is a 4-byte big-endian length and a pickle of one
message. Pickle is safe here because both ends are the same program and the socketpair is
created by the main process before it starts the worker: nobody else can write to it.

Private keys cross only this channel: ``encode_certificate`` turns a ``WorkloadCertificate`` into
DER bytes (PKCS#8 for the key, unencrypted: the socketpair is the protection) and
``decode_certificate`` rebuilds it in the worker, with ``agent.identity.der`` reading the
certificates: workers never import ``cryptography`` (ARCHITECTURE.md, "A small agent").
Neither is ever logged; the ``Reply`` or ``Note`` carrying one has a ``repr`` without its value.
"""

from __future__ import annotations

import copyreg
import pickle
import struct
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.identity.certs import PrivateKey, WorkloadCertificate
from agent.identity.der import Certificate
from agent.identity.spiffe import SpiffeId

HEADER = struct.Struct("!I")
# A frame this large is a bug on the other side (a full state of thousands of pods is a few MiB).
MAX_FRAME = 256 << 20


class WireError(ValueError):
    """A frame that cannot be a message of this protocol (the peer is broken)."""


@dataclass(frozen=True)
class Call:
    """A question that expects one ``Reply`` with the same ``id``."""

    id: int
    kind: str
    args: object = None


@dataclass(frozen=True)
class Reply:
    id: int
    value: object = field(default=None, repr=False)  # may hold key material: never shown
    error: str | None = None


@dataclass(frozen=True)
class Note:
    """A one-way message (state changes, drain)."""

    kind: str
    args: object = field(default=None, repr=False)  # a ``certificate`` note holds a key


Message = Call | Reply | Note


def read_only(d: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(d)


def _mappingproxy(m: MappingProxyType[Any, Any]) -> tuple[object, tuple[dict[Any, Any]]]:
    return read_only, (dict(m),)


# The state's model keeps its label and port maps read-only as ``MappingProxyType``, which
# pickle refuses by default; it travels as the dict it wraps and is wrapped again on arrival.
copyreg.pickle(MappingProxyType, _mappingproxy)  # type: ignore[arg-type]


def encode(message: Message) -> bytes:
    try:
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise WireError(f"cannot send a {type(message).__name__}: {e}") from e
    if len(body) > MAX_FRAME:
        raise WireError(f"a {type(message).__name__} of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


class Decoder:
    """Feed it bytes as they arrive; it returns the complete messages among them."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise WireError(f"frame of {size} bytes announced; at most {MAX_FRAME} expected")
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            try:
                message = pickle.loads(self._buf[HEADER.size : end])
            except Exception as e:  # a truncated or foreign pickle: any error means the same
                raise WireError(f"undecodable frame: {type(e).__name__}") from e
            del self._buf[:end]
            if not isinstance(message, Call | Reply | Note):
                raise WireError(f"unexpected {type(message).__name__} on the worker channel")
            out.append(message)
        return out


def encode_certificate(cert: WorkloadCertificate) -> tuple[str, bytes, list[bytes], list[bytes]]:
    """(identity, PKCS#8 DER key, DER chain, DER roots): for the worker channel only."""
    return (
        str(cert.identity),
        cert.key.der,
        [c.der for c in cert.chain],
        [c.der for c in cert.roots],
    )


def decode_certificate(value: object) -> WorkloadCertificate:
    try:
        if not isinstance(value, tuple) or len(value) != 4:
            raise WireError("a certificate travels as (identity, key, chain, roots)")
        identity: str = value[0]
        key_der: bytes = value[1]
        chain: list[bytes] = value[2]
        roots: list[bytes] = value[3]
        return WorkloadCertificate(
            SpiffeId.parse(identity),
            PrivateKey(key_der),
            tuple(Certificate.from_der(c) for c in chain),
            tuple(Certificate.from_der(c) for c in roots),
        )
    except WireError:
        raise
    except (TypeError, ValueError) as e:
        raise WireError(f"malformed certificate on the worker channel: {type(e).__name__}") from e
