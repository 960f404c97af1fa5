"""How many bytes a release frees, when the caller does not say.

``retire(obj, release, size=None)`` feeds the byte budget and the hard cap
with ``estimate_size(obj)``: ``obj.nbytes`` for buffers (memoryview, array
and numpy-like objects), ``len(obj)`` for an ``mmap.mmap``, and
``sys.getsizeof(obj)`` for anything else. ``getsizeof`` does not follow
references, so callers pass ``size=`` for a resource whose memory lives
behind it (a model, a table of objects).

Which rule applies depends only on the type, so it is worked out once per
type and cached as the function to call (``sizer_of``): the retire path
then costs one dict lookup and one call.
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


#: type -> the function that sizes its instances (filled by sizer_of).
SIZERS: dict[type, Sizer] = {}


def sizer_of(t: type) -> Sizer:
    """The sizing rule for instances of ``t`` (cached in SIZERS)."""
    sizer = SIZERS.get(t)
    if sizer is None:
        if isinstance(getattr(t, "nbytes", None), (property, type(memoryview.nbytes))):
            sizer = _by_nbytes
        elif t.__name__ == "mmap" and t.__module__ == "mmap":
            sizer = _by_len
        else:
            sizer = sys.getsizeof
        SIZERS[t] = sizer
    return sizer


def estimate_size(obj: Any) -> int:
    """retire()'s default size: ``obj.nbytes`` for buffers (memoryview,
    numpy/array-like objects), ``len()`` for mmaps, else sys.getsizeof."""
    return sizer_of(type(obj))(obj)
