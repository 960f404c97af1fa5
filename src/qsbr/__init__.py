"""qsbr: Quiescent-State Based Reclamation for Python threads.

Readers use shared resources without a lock and report quiescent states;
writers unlink a resource and retire it; its release (close(), free, return
to a pool) runs only after every thread that could still hold it has passed
a quiescent state. The design is CPython's own (InternalDocs/qsbr.md); see
docs/design.md for how this package maps onto it.
"""

from __future__ import annotations

from .domain import Domain, default_domain
from .errors import NotRegisteredError
from .stats import DomainStats

__all__ = ["Domain", "DomainStats", "NotRegisteredError", "default_domain"]
__version__ = "0.1.0"
