"""qsbr: Quiescent-State Based Reclamation for Python threads.

Readers use shared resources without a lock and report quiescent states;
writers unlink a resource and retire it; its release (close(), free, return
to a pool) runs only after every thread that could still hold it has passed
a quiescent state. The design is CPython's own (InternalDocs/qsbr.md); see
docs/design.md for how this package maps onto it.

``qsbr.implementation`` is "native" when the C kernel (qsbr._kernel) is in
use and "python" when the pure-Python twin is (no compiler at install time,
or QSBR_PURE_PYTHON=1 in the environment at import): see kernel.py.
"""

from __future__ import annotations

from .buffer_pool import BufferPool, ClassStats, PoolStats
from .cell import Cell
from .default import default_domain
from .domain import Domain
from .errors import (
    NotRegisteredError,
    PendingLimitError,
    PoolExhaustedError,
    UnprotectedReadError,
    UseAfterReleaseError,
)
from .executor import ThreadPoolExecutor
from .kernel import IMPLEMENTATION as implementation
from .servers import ReadSectionHTTPRequestHandler, ReadSectionMiddleware, ReadSectionMixin
from .shared_array import SharedArray
from .shared_cell import SharedCell
from .shared_domain import SharedDomain, SharedDomainStats, SharedThreadHandle
from .sizes import estimate_size
from .stall import StallReport
from .stats import DomainStats
from .thread_state import ThreadHandle

__all__ = [
    "BufferPool",
    "Cell",
    "ClassStats",
    "Domain",
    "DomainStats",
    "NotRegisteredError",
    "PendingLimitError",
    "PoolExhaustedError",
    "PoolStats",
    "ReadSectionHTTPRequestHandler",
    "ReadSectionMiddleware",
    "ReadSectionMixin",
    "SharedArray",
    "SharedCell",
    "SharedDomain",
    "SharedDomainStats",
    "SharedThreadHandle",
    "StallReport",
    "ThreadHandle",
    "ThreadPoolExecutor",
    "UnprotectedReadError",
    "UseAfterReleaseError",
    "default_domain",
    "estimate_size",
    "implementation",
]
__version__ = "0.1.0"
