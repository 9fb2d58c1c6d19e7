"""A read-only mapping whose copy-with-changes costs O(changed shards), not O(size).

Why: every committed update publishes a new immutable snapshot. Copying a 10,000-entry dict per
pod event (and each index with it) made one update cost milliseconds, most of it copying what
did not change. ``CowMap`` splits its entries into a fixed number of shards by key hash; an edit
(``edit()`` -> ``CowMapEdit``) shares every shard with the original and copies only the shards it
writes, so a single-key update copies one shard of ~n/256 entries plus a 256-slot tuple. Readers
get an ordinary ``Mapping`` (lookups are one hash and two indexings). It is the poor man's HAMT:
no dependency, and fast enough at the sizes a node agent sees.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from itertools import chain
from typing import Any, Generic, TypeVar, cast

K = TypeVar("K")
V = TypeVar("V")

_BITS = 8
_MASK = (1 << _BITS) - 1
_EMPTY_SHARD: dict[Any, Any] = {}


class CowMap(Mapping[K, V], Generic[K, V]):
    """Immutable mapping; build one with ``CowMap.of(...)`` or ``existing.edit()...freeze()``."""

    __slots__ = ("_len", "_shards")

    def __init__(self, shards: tuple[dict[K, V], ...] | None = None, length: int = 0) -> None:
        self._shards: tuple[dict[K, V], ...] = shards or (cast(dict[K, V], _EMPTY_SHARD),) * (
            _MASK + 1
        )
        self._len = length

    @classmethod
    def of(cls, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> CowMap[K, V]:
        edit: CowMapEdit[K, V] = cls().edit()
        pairs = items.items() if isinstance(items, Mapping) else items
        for key, value in pairs:
            edit[key] = value
        return edit.freeze()

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) & _MASK][key]

    def get(self, key: K, default: Any = None) -> Any:
        return self._shards[hash(key) & _MASK].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & _MASK]

    def __iter__(self) -> Iterator[K]:
        return chain.from_iterable(self._shards)

    def __len__(self) -> int:
        return self._len

    def keys(self) -> KeysView[K]:
        return KeysView(self)

    def values(self) -> ValuesView[V]:
        return _Values(self)

    def items(self) -> ItemsView[K, V]:
        return _Items(self)

    def __repr__(self) -> str:
        return f"CowMap({dict(self.items())!r})"

    def edit(self) -> CowMapEdit[K, V]:
        return CowMapEdit(self)


class _Values(ValuesView[V]):
    """Iterates the shards' own value views (no per-key lookups)."""

    def __init__(self, cow: CowMap[Any, V]) -> None:
        super().__init__(cow)
        self._cow = cow

    def __iter__(self) -> Iterator[V]:
        return chain.from_iterable(s.values() for s in self._cow._shards)


class _Items(ItemsView[K, V]):
    def __init__(self, cow: CowMap[K, V]) -> None:
        super().__init__(cow)
        self._cow = cow

    def __iter__(self) -> Iterator[tuple[K, V]]:
        return chain.from_iterable(s.items() for s in self._cow._shards)


class CowMapEdit(Generic[K, V]):
    """Staged changes to a ``CowMap``; the original is never modified."""

    __slots__ = ("_len", "_owned", "_shards")

    def __init__(self, base: CowMap[K, V]) -> None:
        self._shards = list(base._shards)
        self._owned: set[int] = set()
        self._len = len(base)

    def _own(self, index: int) -> dict[K, V]:
        if index not in self._owned:
            self._shards[index] = dict(self._shards[index])
            self._owned.add(index)
        return self._shards[index]

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) & _MASK][key]

    def get(self, key: K, default: Any = None) -> Any:
        return self._shards[hash(key) & _MASK].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & _MASK]

    def __setitem__(self, key: K, value: V) -> None:
        shard = self._own(hash(key) & _MASK)
        if key not in shard:
            self._len += 1
        shard[key] = value

    def pop(self, key: K, default: Any = None) -> Any:
        index = hash(key) & _MASK
        if key not in self._shards[index]:
            return default
        self._len -= 1
        return self._own(index).pop(key)

    def __iter__(self) -> Iterator[K]:
        return chain.from_iterable(self._shards)

    def freeze(self) -> CowMap[K, V]:
        return CowMap(tuple(self._shards), self._len)
