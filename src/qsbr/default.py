"""The process-wide domain, and how the structures pick their domain.

Every structure (Cell, BufferPool, ThreadPoolExecutor) takes ``domain=None``
meaning ``qsbr.default_domain()``: one domain for the process, created on
first use, so that a program that needs only one never has to pass it
around. A structure given anything else but a Domain refuses it with one
message, from here.
"""

from __future__ import annotations

import threading

from .domain import Domain

__all__ = ["default_domain", "check_domain", "domain_or_default"]

_default: Domain | None = None
_default_lock = threading.Lock()


def default_domain() -> Domain:
    """The process-wide domain, created on first use."""
    global _default
    d = _default
    if d is None:
        with _default_lock:
            if _default is None:
                _default = Domain()
            d = _default
    return d


def check_domain(domain: object) -> Domain | None:
    """``domain`` if it is a Domain or None; TypeError otherwise."""
    if domain is not None and not isinstance(domain, Domain):
        raise TypeError(f"domain must be a qsbr.Domain or None, not {type(domain).__name__}")
    return domain


def domain_or_default(domain: object) -> Domain:
    """``domain`` checked, or the process-wide default domain for None."""
    checked = check_domain(domain)
    return checked if checked is not None else default_domain()
