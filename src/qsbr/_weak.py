"""Callables that do not keep their object alive.

The domain's parts (stall detection, the hard cap, reclamation) call a few
of the domain's own operations (advance, read wr_seq). Holding those as
bound methods would make every part keep its domain alive, and make the
domain and its parts a reference cycle that only the garbage collector
frees: a dropped domain would keep its watchdog thread running until the
next full collection. A part holds a ``weak_method`` instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["weak_method"]

R = TypeVar("R")


def weak_method(method: Callable[..., R]) -> Callable[..., R]:
    """``method`` (a bound method, Python or C), called through a weak
    reference to its object. Calling it once the object is gone raises
    ReferenceError."""
    owner = getattr(method, "__self__", None)
    if owner is None:
        raise TypeError(f"weak_method() needs a bound method, not {method!r}")
    ref = weakref.ref(owner)
    attr = method.__name__  # looked up at each call: a C method has no WeakMethod
    name = method.__qualname__  # not `method` itself: the closure must not hold it

    def call(*args: Any, **kwargs: Any) -> R:
        obj = ref()
        if obj is None:
            raise ReferenceError(f"{name}: its object no longer exists")
        result: R = getattr(obj, attr)(*args, **kwargs)
        return result

    call.__qualname__ = f"weak {name}"
    return call
