"""Received HTTP/2 header blocks, checked in one pass (RFC 9113 section 8.2 and 8.3).

Why not ``h2``'s own check (``validate_inbound_headers``): it is a chain of seven generators,
one of which walks every byte of every name and value in a Python loop; a proxied gRPC call
has its blocks checked at four connection ends (client and upstream side in both agents), and
that was about a tenth of the proxies' time per call. ``check_block`` applies the same rules
(``tests/unit/proxy/test_h2headers.py`` compares it with ``h2``'s, block by block, under
hypothesis) with one regular expression per name and value and one loop for the block's
structure, and ``H2Proxy`` turns ``h2``'s off on its connections and calls it for every block
it receives, before acting on it. A block that breaks a rule is a connection error, as it was
with ``h2`` (the client's: cause ``h2_protocol_error``; the pod's: ``UPSTREAM_PROTOCOL``).

``h2``'s inbound normalisation (joining split ``cookie`` fields) is done here too when a block
has a cookie, so that policy sees one ``cookie`` header as on HTTP/1.1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import Enum

from hpack import NeverIndexedHeaderTuple

Header = tuple[bytes, bytes]

# A field name: lowercase visible ASCII (no 0x00-0x20, A-Z, 0x7f-0xff), a colon only first.
_NAME = re.compile(rb":?[!-9;-@\[-~]+")
# A field value must not hold NUL, CR or LF, nor begin or end with a space or tab.
_BAD_VALUE = re.compile(rb"[\0\r\n]|\A[ \t]|[ \t]\Z")

# Names that matched ``_NAME`` (every block of a call repeats most of them): a set look-up is
# a sixth of a match. Process-wide (a name is no secret), at most ``_GOOD_NAMES`` of at most
# ``_GOOD_NAME_LENGTH`` bytes (~100 KiB); once full, later names are matched each time.
_GOOD_NAMES, _GOOD_NAME_LENGTH = 1024, 64
_good_names: set[bytes] = set()

CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)
PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":status", b":protocol"))
REQUEST_ONLY = frozenset((b":scheme", b":path", b":authority", b":method", b":protocol"))


class Block(Enum):
    """What a header block is: its pseudo-header rules differ."""

    REQUEST = "request"
    RESPONSE = "response"  # final or informational
    TRAILERS = "trailers"


class MalformedHeaders(ValueError):
    """A received header block breaks RFC 9113 (a connection error, as ``h2`` treats it)."""


# Blocks a ``CheckedBlocks`` keeps (per connection and kind), and the most fields of one kept.
_KEPT_BLOCKS, _KEPT_FIELDS = 8, 16


class CheckedBlocks:
    """``check_block`` for the blocks of one kind that one connection's peer sends, keeping the
    last few it found well formed: a gRPC server sends the same response head and trailers on
    every call, and a client without per-call values the same request head (the decoders keep
    their decoding too: ``h2wire.LeanDecoder.block_cache``). A block equal, field for field, to
    a kept one is well formed without being checked again (the check reads nothing but the
    fields); one whose cookies were joined (a new list each time) is not kept. Per connection,
    as the decoders' caches are: nothing one peer sent is looked up for another. At most
    ``_KEPT_BLOCKS`` of at most ``_KEPT_FIELDS`` fields; emptied when full.

    A block ending in a never-indexed field (a source proxy's request head: the client's
    fields, then the call's ``grpc-timeout`` and the proxy's ``x-request-id``, new on every
    call) is kept by its fields before the first never-indexed one, when the rest are plain
    fields (``_plain``: no pseudo-header, ``host``, ``cookie``, ``te`` or connection-specific
    name, whose rules reach across the block); a block beginning with kept fields followed by
    plain fields whose names and values are well formed is well formed (the rest of the check
    reads only what the kept fields set). Anything else is checked whole."""

    __slots__ = ("_kept", "kind")

    def __init__(self, kind: Block) -> None:
        self.kind = kind
        self._kept: set[tuple[Header, ...]] = set()

    def check(self, headers: Sequence[Header]) -> Sequence[Header]:
        key = tuple(headers)
        kept = self._kept
        if key in kept:
            return headers
        # (Looked for only in a block ending in one, as a source proxy's heads end in its
        # ``x-request-id``: any other block that missed is read once more for nothing.)
        cut = _first_never_indexed(key) if key and type(key[-1]) is _NEVER else 0
        if cut and key[:cut] in kept and _plain(key, cut):
            return headers
        checked = check_block(headers, self.kind)
        if checked is headers:
            if cut:  # (``_plain`` again only when the block is new)
                if cut <= _KEPT_FIELDS and _plain(key, cut):
                    self._keep(key[:cut])
            elif len(key) <= _KEPT_FIELDS:
                self._keep(key)
        return checked

    def _keep(self, key: tuple[Header, ...]) -> None:
        if len(self._kept) >= _KEPT_BLOCKS:
            self._kept.clear()
        self._kept.add(key)


_NEVER = NeverIndexedHeaderTuple


def _first_never_indexed(fields: tuple[Header, ...]) -> int:
    """The position of the first never-indexed field, 0 if none (or it is the first)."""
    kinds = list(map(type, fields))  # listed and searched in C
    return kinds.index(_NEVER) if _NEVER in kinds else 0


# Names whose rules reach across a block (the pseudo-headers' order, ``host`` against
# ``:authority`` and once only, cookies joined) or read a value (``te``).
_ACROSS = CONNECTION_SPECIFIC | {b"host", b"cookie", b"te"}


def _plain(fields: tuple[Header, ...], start: int) -> bool:
    """Are the fields from ``start`` on regular fields of no rule across the block, each
    with a well-formed name and value?"""
    for name, value in fields[start:]:
        if name[:1] == b":" or name in _ACROSS:
            return False
        if name not in _good_names and _NAME.fullmatch(name) is None:
            return False
        if value and _BAD_VALUE.search(value) is not None:
            return False
    return True


def check_block(headers: Sequence[Header], kind: Block) -> Sequence[Header]:
    """``headers`` if well formed (with its ``cookie`` fields joined into one, last), else
    ``MalformedHeaders`` naming the first rule broken. As in ``h2``, the cookies are joined
    before the block is checked (so a cookie before a pseudo-header is not out of order)."""
    return _check(headers, kind, joined=False)


def _check(headers: Sequence[Header], kind: Block, *, joined: bool) -> Sequence[Header]:
    pseudo: set[bytes] = set()
    regular = False
    method = authority = host = None
    for name, value in headers:
        if name == b"cookie" and not joined:
            return _check(_join_cookies(headers), kind, joined=True)
        if name not in _good_names:  # a name seen well formed before is not matched again
            if _NAME.fullmatch(name) is None:
                raise MalformedHeaders(f"invalid header name {name!r}")
            if len(name) <= _GOOD_NAME_LENGTH and len(_good_names) < _GOOD_NAMES:
                _good_names.add(name)
        if value and _BAD_VALUE.search(value) is not None:
            raise MalformedHeaders(f"invalid value of header {name!r}")
        if name[0] == 0x3A:  # ":"
            if name in pseudo:
                raise MalformedHeaders(f"duplicate pseudo-header {name!r}")
            if regular:
                raise MalformedHeaders(f"pseudo-header {name!r} after a regular header")
            if name not in PSEUDO:
                raise MalformedHeaders(f"unknown pseudo-header {name!r}")
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value and kind is Block.REQUEST:
                raise MalformedHeaders("empty :path")
            elif name == b":status" and (len(value) != 3 or not value.isdigit()):
                # RFC 9113 8.3.2: a three-digit code. Anything else was taken as a number,
                # and each such code became a new ``response_code`` series kept for good.
                raise MalformedHeaders(f":status {value[:16]!r} is not a three-digit code")
            continue
        regular = True
        if name in CONNECTION_SPECIFIC:
            raise MalformedHeaders(f"connection-specific header {name!r}")
        if name == b"te" and value.lower() != b"trailers":
            raise MalformedHeaders(f"te: {value!r} (only 'trailers' is allowed)")
        if name == b"host" and kind is Block.REQUEST:
            if host is not None:
                raise MalformedHeaders("more than one host header")
            host = value
    _check_pseudo(kind, pseudo, method, authority, host)
    return headers


def _check_pseudo(
    kind: Block,
    pseudo: set[bytes],
    method: bytes | None,
    authority: bytes | None,
    host: bytes | None,
) -> None:
    if kind is Block.TRAILERS:
        if pseudo:
            raise MalformedHeaders("pseudo-header in trailers")
        return
    if kind is Block.RESPONSE:
        if b":status" not in pseudo:
            raise MalformedHeaders("response without :status")
        if pseudo & REQUEST_ONLY:
            raise MalformedHeaders("request pseudo-header in a response")
        return
    if method is None:
        raise MalformedHeaders("request without :method")
    if b":status" in pseudo:
        raise MalformedHeaders(":status in a request")
    connect = method == b"CONNECT"
    if connect and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            raise MalformedHeaders("CONNECT with :scheme or :path")
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        raise MalformedHeaders("request without :scheme or :path")
    if not connect and b":protocol" in pseudo:
        raise MalformedHeaders(":protocol outside CONNECT")
    if authority is None and host is None:
        raise MalformedHeaders("request without :authority or host")
    if authority is not None and host is not None and authority != host:
        raise MalformedHeaders(":authority and host differ")


def _join_cookies(headers: Sequence[Header]) -> list[Header]:
    """RFC 9113 8.2.3: split ``cookie`` fields joined with "; ", as one never-indexed field at
    the end (what ``h2``'s inbound normalisation did)."""
    out = [h for h in headers if h[0] != b"cookie"]
    joined = b"; ".join(v for n, v in headers if n == b"cookie")
    out.append(NeverIndexedHeaderTuple(b"cookie", joined))
    return out
