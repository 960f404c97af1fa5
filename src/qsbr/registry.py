"""The thread registry: registered threads in reusable slots.

CPython keeps its QSBR thread states in an array that grows and whose free
entries are reused (``_Py_qsbr_reserve``). So does this registry: a list of
slots with a free list, so that ``register()`` and ``unregister()`` are O(1)
amortized and 10,000 threads coming and going leave the list no longer than
the most threads registered at once.

Invariants:
* Slot ``i`` holds a ``ThreadState`` whose ``slot == i``, or None.
* The slot list only grows, and is replaced only in a forked child. Scanners
  read it without a lock: a slot they read is a state that was registered at
  some instant during their read (see scan.py for why that is enough).
* Only ``add``, ``remove`` and the fork repair change it, under ``_lock``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from .thread_state import ThreadState

__all__ = ["Registry"]


class Registry:
    """Registered threads in reusable slots."""

    __slots__ = ("_lock", "slots", "_free", "_count")

    def __init__(self) -> None:
        self._lock: Any = threading.Lock()
        #: Slot i holds a ThreadState or None. Only grows; read without a lock.
        self.slots: list[ThreadState | None] = []
        self._free: list[int] = []
        self._count = 0

    def new_locks(self, factory: Callable[[], Any]) -> None:
        """Replace this part's lock with ``factory()`` (see Domain._new_locks)."""
        self._lock = factory()

    def add(self, state: ThreadState) -> None:
        with self._lock:
            if self._free:
                i = self._free.pop()
                self.slots[i] = state
            else:
                i = len(self.slots)
                self.slots.append(state)
            state.slot = i
            self._count += 1

    def remove(self, state: ThreadState) -> bool:
        """Free ``state``'s slot; False when it was not registered."""
        with self._lock:
            i = state.slot
            if i < 0 or i >= len(self.slots) or self.slots[i] is not state:
                return False
            self.slots[i] = None
            state.slot = -1
            self._free.append(i)
            self._count -= 1
            return True

    def after_fork_in_child(self, survivor: ThreadState | None) -> None:
        """Only the forking thread survives a fork: it keeps slot 0."""
        self._lock = threading.Lock()
        self.slots = [survivor] if survivor is not None else []
        self._free = []
        self._count = 1 if survivor is not None else 0
        if survivor is not None:
            survivor.slot = 0

    def __iter__(self) -> Iterator[ThreadState]:
        for st in self.slots[:]:
            if st is not None:
                yield st

    def __len__(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        """Slots allocated: the largest number of threads registered at once."""
        return len(self.slots)
