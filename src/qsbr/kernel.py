"""Which kernel this process runs on: the C twin or the pure-Python one.

The kernel (wr_seq, the threads' seqs, quiescent(), attach/detach, the read
sections, advance() with its timing records, the scan's loads, the loop
that runs releases, and BufferPool's hot path) comes in two twins of identical behaviour:
``qsbr._kernel``, a C extension built at install time where a compiler was
available, and ``qsbr._pykernel``, pure Python, the reference and the
fallback. The choice is made once, at import:

* ``QSBR_PURE_PYTHON=1`` (any value but "" and "0") forces the pure twin;
* otherwise the C twin if it was built, else the pure one.

``IMPLEMENTATION`` (``qsbr.implementation``) says which: "native" or "python".
Nothing else in the package imports either twin directly.

Two parts have no Python twin in _pykernel.py. ``SharedWords`` and
``SharedSlot`` and ``CellReader`` (qsbr._shared, a second small extension: C11 atomics on a
shared-memory segment) exist only on the native kernel, and SharedDomain
refuses to run without them (shared_domain.py says why). And ``PoolCore``, the C fast path
of a BufferPool, is None on the pure kernel, and the pool then runs the
Python code that is its reference (buffer_pool.py, "The C fast path").
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from ._pykernel import Sink  # where the pure twin's detached stores land (unused by the C twin)

__all__ = [
    "IMPLEMENTATION",
    "DomainCore",
    "GraceTiming",
    "ThreadCore",
    "ThreadHandle",
    "ReadSection",
    "DetachedSection",
    "scan_slots",
    "run_entries",
    "specialize",
    "MAX_DEPTH",
    "PoolCore",
    "native_error",
    "Sink",
    "SharedWords",
    "SharedSlot",
    "CellReader",
    "shared_error",
]


def _pure_requested() -> bool:
    return os.environ.get("QSBR_PURE_PYTHON", "") not in ("", "0")


#: Why the C twin is not in use (None when it is).
native_error: str | None = None

if TYPE_CHECKING:
    # Type checkers see the reference twin; the C twin has the same API.
    from ._pykernel import (
        MAX_DEPTH,
        DetachedSection,
        DomainCore,
        GraceTiming,
        PoolCore,
        ReadSection,
        ThreadCore,
        ThreadHandle,
        run_entries,
        scan_slots,
        specialize,
    )

    IMPLEMENTATION: str
elif _pure_requested():
    from ._pykernel import (
        MAX_DEPTH,
        DetachedSection,
        DomainCore,
        GraceTiming,
        PoolCore,
        ReadSection,
        ThreadCore,
        ThreadHandle,
        run_entries,
        scan_slots,
        specialize,
    )

    IMPLEMENTATION = "python"
    native_error = "QSBR_PURE_PYTHON is set"
else:
    try:
        from ._kernel import (
            MAX_DEPTH,
            DetachedSection,
            DomainCore,
            GraceTiming,
            PoolCore,
            ReadSection,
            ThreadCore,
            ThreadHandle,
            run_entries,
            scan_slots,
            specialize,
        )
    except ImportError as exc:  # not built (no compiler at install time), or built for another Python
        from ._pykernel import (
            MAX_DEPTH,
            DetachedSection,
            DomainCore,
            GraceTiming,
            PoolCore,
            ReadSection,
            ThreadCore,
            ThreadHandle,
            run_entries,
            scan_slots,
            specialize,
        )

        IMPLEMENTATION = "python"
        native_error = f"the C kernel is not available: {exc}"
    else:
        IMPLEMENTATION = "native"

#: SharedDomain's atomics (None on the pure kernel), and why they are missing.
SharedWords: Any = None
SharedSlot: Any = None
CellReader: Any = None
shared_error: str | None = None
if IMPLEMENTATION == "native":
    try:
        _shared = importlib.import_module("qsbr._shared")
    except ImportError as exc:  # built without it (an older install): SharedDomain says so
        shared_error = f"the C extension qsbr._shared is not available: {exc}"
    else:
        SharedWords, SharedSlot, CellReader = _shared.SharedWords, _shared.SharedSlot, _shared.CellReader
else:
    shared_error = f"the pure-Python kernel is in use ({native_error})"
