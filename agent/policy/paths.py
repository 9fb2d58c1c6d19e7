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
default) and ``%2F`` stays encoded. The request is forwarded as sent: only what policy compares
changes, and a server that resolves the path itself reaches what policy saw.

The host, likewise: a server that receives the absolute form must ignore ``Host`` and use the
target's authority (RFC 9112 3.2.2), so that authority is what ``hosts`` rules compare.
"""

from __future__ import annotations

import re

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# A target in absolute form: ``scheme://authority`` and then the path (RFC 3986 3.1).
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def policy_target(target: str, host: str) -> tuple[str, str]:
    """The path and host L7 policy compares for a request to ``target`` (without its query)
    whose ``Host`` (or ``:authority``) is ``host`` (see the module docstring)."""
    if target[:1] != "/" and "://" in target:
        found = _ABSOLUTE.match(target)
        if found is not None:
            host = found.group(0).partition("://")[2]
            target = target[found.end() :] or "/"
    return policy_path(target), host


def policy_path(target: str) -> str:
    """An origin-form ``target`` normalized (see the module docstring)."""
    if "%" not in target and "\\" not in target and "/." not in target:
        return target  # nothing to normalize: the usual request
    path = _ESCAPE.sub(_unescape, target.replace("\\", "/"))
    return _without_dot_segments(path) if "/." in path else path


def _unescape(match: re.Match[str]) -> str:
    code = int(match.group(1), 16)
    return chr(code) if code in _UNRESERVED else "%" + match.group(1).upper()


def _without_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on a path that starts with ``/``."""
    segments = path.split("/")
    out: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    # A final ``.`` or ``..`` names a directory: the path keeps its trailing ``/``.
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)
