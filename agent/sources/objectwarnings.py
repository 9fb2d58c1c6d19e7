"""Which warnings (``agent.policy.warnings``) each object has, and which were already said.

The Kubernetes source records a warning as an Event of type Warning on the object, where
``kubectl describe`` shows it. A resync, a relist, the agent's own status write coming back
as an event: each would repeat it, so these ledgers remember what was said and return only
what is new, for the source to record (they do no I/O themselves). They also log each new
warning once, and hold the current ones for the admin API (``nodemesh status``).

* Pods: only the agent of the pod's node speaks of it (a cluster of N nodes does not record N
  copies). A warning is said once per pod uid; a pod whose annotations change is told only
  of what is new.
* Policies: every agent computes the same warnings and logs them, once per generation and
  message; only the holder of the route-status Lease records them (``due(write=True)``), so
  N agents do not write N Events. What a follower computed stays due: it records it when it
  takes the Lease.

The ledgers live in one process, so what a restarted agent or a new Lease holder says again is
kept from becoming a second Event by the Event's name (``event_name``): it is made of what was
said and on which occasion (the object's uid, for a policy its generation, the reason and the
message), so the same warning is the same Event, and the API server refuses it a second time
(409, taken as "said already"). A pod fixed and broken again the same way is therefore not
told again while its first Event lives (an hour, by the API server's default ``--event-ttl``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

from agent.policy.warnings import ConfigWarning, pod_warnings

log = logging.getLogger(__name__)

Raw = Mapping[str, Any]
ObjectKey = tuple[str, str, str]  # kind, namespace, name
_BOUND = 10_000  # objects remembered; past it the ledger starts afresh (worst case: a repeat)


@dataclass(frozen=True)
class Due:
    """A warning to record on one object."""

    key: ObjectKey
    uid: str
    warning: ConfigWarning
    occasion: str = ""  # what makes it news again: a policy's generation


def event_name(key: ObjectKey, uid: str, occasion: str, reason: str, message: str) -> str:
    """The name of the Event that says ``message`` of object ``key``: the same saying, the same
    name, whichever agent or process says it (a DNS subdomain: 253 characters at most)."""
    said = "\0".join((uid, occasion, reason, message)).encode()
    suffix = ".nodemesh-" + hashlib.sha256(said).hexdigest()[:16]
    return key[2][: 253 - len(suffix)].rstrip(".") + suffix


def _identity(kind: str, obj: Raw) -> tuple[ObjectKey, str, int]:
    meta = obj.get("metadata") or {}
    key = (kind, str(meta.get("namespace") or ""), str(meta.get("name") or ""))
    return key, str(meta.get("uid") or ""), int(meta.get("generation") or 0)


def _named(key: ObjectKey) -> str:
    """``Pod default/web``; a cluster-scoped object without the slash (``Namespace shop``)."""
    kind, namespace, name = key
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def _describe(key: ObjectKey, warning: ConfigWarning) -> dict[str, str]:
    return {"object": _named(key), "reason": warning.reason, "message": warning.message}


class PodWarnings:
    """The unknown-annotation warnings of the pods on ``node``."""

    def __init__(self, node: str | None) -> None:
        self.node = node
        self._lock = threading.Lock()
        self._said: dict[str, tuple[ObjectKey, frozenset[ConfigWarning]]] = {}  # uid ->

    def observe(self, obj: Raw, *, deleted: bool = False) -> list[Due]:
        """The pod as the API server holds it now: the warnings not yet said of it."""
        key, uid, _ = _identity("Pod", obj)
        local = self.node is not None and (obj.get("spec") or {}).get("nodeName") == self.node
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        now = frozenset(pod_warnings(annotations)) if local and not deleted else frozenset()
        with self._lock:
            _, before = self._said.pop(uid, (key, frozenset()))
            if now:
                if len(self._said) >= _BOUND:
                    self._said.clear()
                self._said[uid] = (key, now)
        new = sorted(now - before, key=lambda w: w.message)
        for warning in new:
            log.warning("pod %s/%s: %s (meshed all the same)", key[1], key[2], warning.message)
        return [Due(key, uid, w) for w in new]

    def current(self) -> list[dict[str, str]]:
        with self._lock:
            said = list(self._said.values())
        return [_describe(key, w) for key, ws in said for w in sorted(ws, key=str)]


class PolicyWarnings:
    """The never-matching warnings of the policies, per generation; also (a ledger of its own)
    the namespaces' mesh-label warnings, per label value (a label change keeps the generation).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> (uid, occasion, its warnings, those recorded)
        self._held: dict[ObjectKey, tuple[str, str, tuple[ConfigWarning, ...], set[ConfigWarning]]]
        self._held = {}

    def observe(
        self, kind: str, obj: Raw, warnings: list[ConfigWarning], *, occasion: str | None = None
    ) -> None:
        """An object's current warnings (empty: none, or a refused policy: ``Accepted`` says
        why); ``occasion`` is what makes them news again, by default the generation."""
        key, uid, generation = _identity(kind, obj)
        when = str(generation) if occasion is None else occasion
        with self._lock:
            held = self._held.get(key)
            if held is not None and held[:2] == (uid, when):
                return  # judged already on this occasion (e.g. our own status write)
            if not warnings:
                self._held.pop(key, None)
                return
            if len(self._held) >= _BOUND:
                self._held.clear()
            self._held[key] = (uid, when, tuple(warnings), set())
        where = f" (generation {generation})" if occasion is None else ""
        for warning in warnings:
            log.warning("%s%s: %s", _named(key), where, warning.message)

    def due(self, live: Container[ObjectKey], *, write: bool) -> list[Due]:
        """Forget policies no longer in ``live``; with ``write`` (the Lease holder), return
        the warnings not recorded yet and count them as recorded."""
        out = []
        with self._lock:
            for key in [k for k in self._held if k not in live]:
                del self._held[key]
            if not write:
                return []
            for key, (uid, occasion, warnings, recorded) in self._held.items():
                for warning in warnings:
                    if warning not in recorded:
                        recorded.add(warning)
                        out.append(Due(key, uid, warning, occasion))
        return out

    def current(self) -> list[dict[str, str]]:
        with self._lock:
            held = [(key, warnings) for key, (_, _, warnings, _) in self._held.items()]
        return [_describe(key, w) for key, ws in held for w in ws]
