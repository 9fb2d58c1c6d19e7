"""Per-class copies of methods a base class's subclasses share, each with its own bytecode.

Why: CPython 3.11's specializing interpreter caches, in a code object's bytecode, how an
attribute read or write found the attribute for the one type it saw there. A method that
instances of two subclasses both run sees two types at each ``self.x``: one of them misses
every time (the generic lookup, and a respecialization every 53 misses). Measured on the
HTTP/1.1 readers' llhttp callbacks (docs/performance/http1-cost.md, "Shared callbacks given
to each half"): about 5,000 instructions fewer per request read and answered. A new function
around the same code object (a closure made per class) would share its bytecode, and the
misses: each copy gets a new code object (``CodeType.replace``), its source and line numbers
the original's, so tracebacks and coverage read the same.
"""

from __future__ import annotations

import types


def own_copy(function: types.FunctionType, owner: type) -> types.FunctionType:
    """``function`` for ``owner`` alone: a new function around a new code object."""
    copy = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__doc__ = function.__doc__
    copy.__annotations__ = function.__annotations__
    copy.__qualname__ = f"{owner.__qualname__}.{function.__name__}"
    return copy


def give_own_copies(cls: type, names: tuple[str, ...]) -> None:
    """Each method in ``names`` that ``cls`` inherits becomes ``cls``'s own copy (one it
    defines itself stays as written). Called from the base's ``__init_subclass__``."""
    for name in names:
        if name not in cls.__dict__:
            inherited = getattr(cls, name)
            if not isinstance(inherited, types.FunctionType):
                raise TypeError(f"{cls.__qualname__}.{name} is not a plain function to copy")
            setattr(cls, name, own_copy(inherited, cls))
