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
    """``method`` (a bound method), called through a weak reference to its
    object. Calling it once the object is gone raises ReferenceError."""
    ref: weakref.WeakMethod[Any] = weakref.WeakMethod(method)
    name = method.__qualname__  # not `method` itself: the closure must not hold it

    def call(*args: Any, **kwargs: Any) -> R:
        bound = ref()
        if bound is None:
            raise ReferenceError(f"{name}: its object no longer exists")
        result: R = bound(*args, **kwargs)
        return result

    call.__qualname__ = f"weak {name}"
    return call
