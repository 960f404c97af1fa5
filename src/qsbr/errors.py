"""Exceptions raised by qsbr.

Every error says what went wrong and what to do about it: the caller should
never have to read the source to recover.
"""

from __future__ import annotations

__all__ = ["NotRegisteredError"]


class NotRegisteredError(RuntimeError):
    """The calling thread used a per-thread operation without registering.

    quiescent(), detach(), attach(), retire(), defer() and unregister() act on
    the calling thread's own state, so the thread must first call
    ``Domain.register()`` (or enter ``with domain.registered():``).
    """
