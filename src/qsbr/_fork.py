"""Repair after os.fork(): one mechanism for the domains and the structures.

Only the forking thread survives a fork. A lock that another thread held at
that instant stays held forever in the child, and the other threads'
registrations name threads that no longer exist. Every Domain, Cell,
BufferPool and SharedArray calls ``track(self)`` when it is made; in the
child, each one's ``_after_fork_in_child()`` runs. A domain keeps only the
forking thread's registration and adopts the others' backlogs (domain.py);
the structures get fresh locks, and their data is as the fork found it: a
writer that was half-way through an update in another thread did not
finish it, as with any object shared across a fork.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Protocol


class _Forkable(Protocol):
    def _after_fork_in_child(self) -> None: ...


_tracked: weakref.WeakSet[_Forkable] = weakref.WeakSet()
_tracked_lock = threading.Lock()


def track(obj: _Forkable) -> None:
    with _tracked_lock:
        _tracked.add(obj)


def _after_fork_in_child() -> None:
    global _tracked_lock
    _tracked_lock = threading.Lock()
    for obj in list(_tracked):
        obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
