"""The digest of what a reflector applied: equal for the same objects, whatever the order."""

from __future__ import annotations

from typing import Any

from agent.sources.contents import Contents


def obj(name: str, rv: int, *, ns: str = "default", uid: str | None = None) -> dict[str, Any]:
    meta = {"name": name, "namespace": ns, "uid": uid or f"uid-{name}", "resourceVersion": str(rv)}
    return {"metadata": meta}


def test_the_same_objects_by_list_or_by_events_in_any_order_give_one_digest() -> None:
    listed, watched = Contents(), Contents()
    listed.replace([obj("a", 3), obj("b", 5)])
    watched.event("ADDED", obj("b", 2))
    watched.event("ADDED", obj("a", 3))
    watched.event("MODIFIED", obj("b", 5))
    assert listed.digest() == watched.digest()
    assert len(listed) == len(watched) == 2


def test_any_change_of_the_set_changes_the_digest_and_undoing_it_restores_it() -> None:
    c = Contents()
    c.replace([obj("a", 3), obj("b", 5)])
    before = c.digest()
    c.event("MODIFIED", obj("a", 7))
    assert c.digest() != before
    c.event("MODIFIED", obj("a", 3))
    assert c.digest() == before
    c.event("DELETED", obj("b", 9))
    assert c.digest() != before and len(c) == 1
    c.event("ADDED", obj("b", 5))
    assert c.digest() == before
    c.event("ADDED", obj("b", 5, uid="recreated"))  # same name, another object
    assert c.digest() != before


def test_an_empty_set_and_the_uid_of_the_tracked_object() -> None:
    c = Contents(track=("", "kube-system"))
    assert c.digest() == "0" * 32 and c.tracked_uid() is None
    c.replace([obj("kube-system", 1, ns="", uid="cafe"), obj("default", 2, ns="")])
    assert c.tracked_uid() == "cafe"
    c.event("DELETED", obj("kube-system", 3, ns="", uid="cafe"))
    assert c.tracked_uid() is None
    c.event("ADDED", obj("kube-system", 4, ns="", uid="beef"))
    assert c.tracked_uid() == "beef"
    c.replace([])
    assert c.digest() == "0" * 32 and c.tracked_uid() is None
