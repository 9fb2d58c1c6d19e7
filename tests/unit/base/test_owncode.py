"""Per-class copies of shared methods: each subclass's own bytecode, the same behaviour."""

from __future__ import annotations

import pytest

from agent.base.owncode import give_own_copies

COPIED = ("total",)


class Base:
    __slots__ = ("a", "b")

    def __init__(self) -> None:
        self.a, self.b = 1, 2

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        give_own_copies(cls, COPIED)

    def total(self, extra: int = 0, *, scale: int = 1) -> int:
        """The sum."""
        return (self.a + self.b + extra) * scale


class One(Base):
    __slots__ = ("one",)


class Two(Base):
    __slots__ = ("two",)


class Own(Base):
    __slots__ = ()

    def total(self, extra: int = 0, *, scale: int = 1) -> int:
        return -1


def test_each_subclass_has_its_own_code_object_and_behaves_as_the_original() -> None:
    assert One.total.__code__ is not Two.total.__code__
    assert One.total.__code__ is not Base.total.__code__
    assert One.total.__qualname__ == "One.total"
    assert One.total.__doc__ == "The sum."
    assert One.total.__code__.co_firstlineno == Base.total.__code__.co_firstlineno
    assert One().total(3, scale=2) == Two().total(3, scale=2) == Base().total(3, scale=2) == 12


def test_a_method_the_subclass_defines_stays_as_written() -> None:
    assert Own().total() == -1


def test_a_name_that_is_not_a_plain_function_is_refused_by_name() -> None:
    class Props:
        @property
        def size(self) -> int:
            return 1

    with pytest.raises(TypeError, match=r"Sub\.size is not a plain function"):
        give_own_copies(type("Sub", (Props,), {}), ("size",))
