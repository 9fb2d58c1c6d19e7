"""The path (and host) L7 policy matches: a request target normalized as Istio does by default.

Why: ``paths: ["/admin*"]`` must bear on every spelling of ``/admin`` that the pod's server
reads as ``/admin``. Compared as sent, ``/%61dmin``, ``/public/../admin``, ``/./admin``,
``/public\\..\\admin`` and the absolute form ``http://host/admin`` (which RFC 9112 3.2.2 obliges
a server to accept) slipped past a DENY rule, and the dot-segment forms out of an ALLOW prefix.

What: Istio's default (``meshConfig.pathNormalization: BASE``, Envoy's ``normalize_path``,
RFC 3986 normalization plus ``\\`` as ``/``): an absolute-form target is reduced to its path,
``\\`` becomes ``/``, percent-escapes of unreserved characters (letters, digits, ``-._~``) are
decoded and the hex of the others upper-cased, then dot segments are removed (``..`` never
climbs above the root). As in Istio's default, ``//`` is kept (``MERGE_SLASHES`` is not the
default) and ``%2F`` stays encoded. An HTTP/1.1 request is forwarded so normalized, in
origin-form (its reader, ``agent.proxy.http1_codec``, as Envoy does), and an HTTP/2 ``:path``
likewise where each end reads its head (``agent.proxy.h2core``), so policy, routes and the pod
read one path.

The host, likewise: a server that receives the absolute form must ignore ``Host`` and use the
target's authority (RFC 9112 3.2.2), so that authority is what ``hosts`` rules compare.
"""

from __future__ import annotations

import re

# RFC 3986 2.3: what a percent-encoding may be decoded to without changing the URI's meaning
UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
# A target in absolute form: ``scheme://authority`` and then the path (RFC 3986 3.1).
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def normalized_path(target: bytes) -> bytes:
    """``target`` (origin-form, or ``*``) with its path normalized (see the module docstring);
    its query as it came. The one implementation: the HTTP/1.1 reader forwards what it gives
    (``agent.proxy.http1_codec``), and policy compares it for every protocol (``policy_path``)."""
    path, mark, query = target.partition(b"?")
    if path[:1] != b"/":
        return target
    path = _ESCAPE.sub(_unescape, path.replace(b"\\", b"/"))
    return (_without_dot_segments(path) if b"/." in path else path) + mark + query


def policy_target(target: str, host: str) -> tuple[str, str]:
    """The path and host L7 policy compares for a request to ``target`` (without its query)
    whose ``Host`` (or ``:authority``) is ``host`` (see the module docstring). An HTTP/1.1
    request's target arrives here in origin-form and normalized already (its reader forwards
    it so), an HTTP/2 ``:path`` normalized too (``agent.proxy.h2core``)."""
    if target[:1] != "/" and "://" in target:
        found = _ABSOLUTE.match(target)
        if found is not None:
            host = found.group(0).partition("://")[2]
            target = target[found.end() :] or "/"
    return policy_path(target), host


def policy_path(target: str) -> str:
    """An origin-form ``target`` normalized (``normalized_path``; bytes other than ASCII pass
    through as they came)."""
    if "%" not in target and "\\" not in target and "/." not in target:
        return target  # nothing to normalize: the usual request
    raw = target.encode("utf-8", "surrogateescape")
    return normalized_path(raw).decode("utf-8", "surrogateescape")


def _unescape(escape: re.Match[bytes]) -> bytes:
    """A percent-encoding: decoded if it encodes an unreserved character, else its hex
    upper-cased (RFC 3986 6.2.2.1, as Envoy's normalization writes it)."""
    code = int(escape.group(1), 16)
    return bytes((code,)) if code in UNRESERVED else b"%" + escape.group(1).upper()


def _without_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4 on a path that starts with ``/``: ``.`` segments dropped, ``..`` drops
    the one before it (none above the root); a path ending in either ends with ``/``."""
    segments = path.split(b"/")
    kept: list[bytes] = []
    for segment in segments[1:]:
        if segment == b"..":
            if kept:
                kept.pop()
        elif segment != b".":
            kept.append(segment)
    if segments[-1] in (b".", b".."):
        kept.append(b"")
    return b"/" + b"/".join(kept)
