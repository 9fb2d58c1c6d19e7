"""What a reflector has applied, as one digest that agents can compare (``nodemesh proxy-status``).

A reflector's resourceVersion says how recent the last thing the API server sent it is, not
what it holds: an agent that has watched an unchanged resource for a minute holds an older
revision than one that just listed it, though both applied the same objects. Two agents agree
exactly when they hold the same objects at the same versions, so each reflector keeps a digest
of that set: per object, a hash of its namespace, name, uid and ``metadata.resourceVersion``
(the etcd revision of its last change, the same for every watcher), combined by XOR so that the
order events arrive in does not matter and one event costs one short hash (no re-hash of the
whole kind). An object is counted once its handler took it; one the handler could not take
leaves the digest as it was, so that agent shows as behind the others.

Per object only its key and its hash are kept (about 250 bytes with the key's strings; the uid
is not kept), but for one object named at construction (``track``) whose uid is kept: the
``kube-system`` namespace's tells one cluster from another (``KubeSource.cluster_id``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

Key = tuple[str, str]  # namespace ("" when cluster-scoped), name


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _key(meta: Mapping[str, Any]) -> Key:
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _hash(key: Key, uid: str, revision: str) -> int:
    text = f"{key[0]}\0{key[1]}\0{uid}\0{revision}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "big")


class Contents:
    """The objects one reflector has applied: ``digest()`` changes whenever one of them does."""

    def __init__(self, *, track: Key | None = None) -> None:
        self._objects: dict[Key, int] = {}  # key -> its hash
        self._digest = 0
        self._track = track
        self._tracked_uid: str | None = None

    def replace(self, items: Iterable[Mapping[str, Any]]) -> None:
        """A list: the whole set is what the list held (built aside, then swapped in, so a
        reader in another thread sees the old set or the new one)."""
        fresh = Contents(track=self._track)
        for obj in items:
            fresh.event("ADDED", obj)
        self._objects, self._digest = fresh._objects, fresh._digest
        self._tracked_uid = fresh._tracked_uid

    def event(self, kind: str, obj: Mapping[str, Any]) -> None:
        """An ADDED, MODIFIED or DELETED event the handler applied."""
        meta = _meta(obj)
        key = _key(meta)
        old = self._objects.pop(key, None)
        if old is not None:
            self._digest ^= old
        uid = str(meta.get("uid") or "")
        if key == self._track:
            self._tracked_uid = None if kind == "DELETED" else uid or None
        if kind == "DELETED":
            return
        mine = _hash(key, uid, str(meta.get("resourceVersion") or ""))
        self._objects[key] = mine
        self._digest ^= mine

    def digest(self) -> str:
        """Hex, 32 digits; equal on two agents exactly when they hold the same objects."""
        return f"{self._digest:032x}"

    def tracked_uid(self) -> str | None:
        """The uid of the object named by ``track``, while it is held."""
        return self._tracked_uid

    def __len__(self) -> int:
        return len(self._objects)
