"""How many bytes a release frees, when the caller does not say.

``retire(obj, release, size=None)`` feeds the byte budget and the hard cap
with ``estimate_size(obj)``: ``obj.nbytes`` for buffers (memoryview, array
and numpy-like objects), ``len(obj)`` for an ``mmap.mmap``, and
``sys.getsizeof(obj)`` for anything else. ``getsizeof`` does not follow
references, so callers pass ``size=`` for a resource whose memory lives
behind it (a model, a table of objects).

Which rule applies depends only on the type, so it is worked out once per
type and cached as the function to call (``sizer_of``): the retire path
then costs one dict lookup and one call. Where ``getsizeof`` cannot vary
between instances (the type has no ``__sizeof__`` of its own and no
variable-length part, and is not a metaclass), the cache holds the size
itself, an ``int``, and the retire path makes no call at all.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["estimate_size", "sizer_of", "SIZERS"]

Sizer = Callable[[Any], int]


def _by_nbytes(obj: Any) -> int:
    n = obj.nbytes
    return n if isinstance(n, int) else sys.getsizeof(obj)


def _by_len(obj: Any) -> int:
    try:
        return len(obj)
    except ValueError:  # a closed mmap frees nothing more
        return 0


#: type -> the function that sizes its instances, or their one size as an
#: int (filled by sizer_of and estimate_size; the C kernel reads it too).
SIZERS: dict[type, Sizer | int] = {}


def _fixed_size(t: type) -> bool:
    """Whether sys.getsizeof gives every instance of ``t`` the same answer:
    object.__sizeof__ (tp_basicsize, plus a per-type part on 3.13), no
    items, and no per-object GC test (only metaclasses have one)."""
    return (
        getattr(t, "__sizeof__", None) is object.__sizeof__
        and getattr(t, "__itemsize__", 1) == 0
        and not issubclass(t, type)
    )


def sizer_of(t: type) -> Sizer:
    """The sizing rule for instances of ``t`` (cached in SIZERS, where a
    fixed size may stand for it: see estimate_size)."""
    sizer = SIZERS.get(t)
    if sizer.__class__ is int:
        return sys.getsizeof
    if sizer is None:
        if isinstance(getattr(t, "nbytes", None), (property, type(memoryview.nbytes))):
            sizer = _by_nbytes
        elif t.__name__ == "mmap" and t.__module__ == "mmap":
            sizer = _by_len
        else:
            sizer = sys.getsizeof
        SIZERS[t] = sizer
    return sizer  # type: ignore[return-value]


def estimate_size(obj: Any) -> int:
    """retire()'s default size: ``obj.nbytes`` for buffers (memoryview,
    numpy/array-like objects), ``len()`` for mmaps, else sys.getsizeof."""
    t = type(obj)
    sizer = SIZERS.get(t)
    if sizer.__class__ is int:
        return sizer
    if sizer is None:
        sizer = sizer_of(t)
        if sizer is sys.getsizeof and _fixed_size(t):
            size: int = sizer(obj)
            SIZERS[t] = size  # every instance has this size: no call next time
            return size
    return sizer(obj)  # type: ignore[operator]
