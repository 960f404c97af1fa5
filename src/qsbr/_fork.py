"""Locks of the structures, made usable again in a child of os.fork().

Only the forking thread survives a fork. A lock that another thread held at
that instant stays held forever in the child. Domain repairs itself
(domain.py). Cell, BufferPool and SharedArray register here and get fresh
locks in the child. Their data is as the fork found it: a writer that was
half-way through an update in another thread did not finish it, as with any
object shared across a fork.
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
