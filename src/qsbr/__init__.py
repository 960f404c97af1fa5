"""qsbr: Quiescent-State Based Reclamation for Python threads.

Readers use shared resources without a lock and report quiescent states;
writers unlink a resource and retire it; its release (close(), free, return
to a pool) runs only after every thread that could still hold it has passed
a quiescent state. The design is CPython's own (InternalDocs/qsbr.md); see
docs/design.md for how this package maps onto it.
"""

from __future__ import annotations

from .domain import Domain, default_domain, estimate_size
from .errors import NotRegisteredError, PendingLimitError
from .stall import StallReport
from .stats import DomainStats

__all__ = [
    "Domain",
    "DomainStats",
    "NotRegisteredError",
    "PendingLimitError",
    "StallReport",
    "default_domain",
    "estimate_size",
]
__version__ = "0.1.0"
