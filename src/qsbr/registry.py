"""Registration: which threads take part, in reusable slots.

CPython keeps its QSBR thread states in an array that grows and whose free
entries are reused (``_Py_qsbr_reserve``). So does this registry: a list of
slots with a free list, so that ``register()`` and ``unregister()`` are O(1)
amortized and 10,000 threads coming and going leave the list no longer than
the most threads registered at once.

A thread finds its own state through the domain's ``threading.local``
(``tls.state``; see thread_state.py for the rest of what the local holds).
Registering creates the state with ``seq = wr_seq`` and publishes it in a
slot; unregistering publishes ``seq = 0`` first, frees the slot and hands
the thread's backlog to the domain (deferred.py: never lost, never run
early). A thread that exits while registered is unregistered by its
``ExitSentinel`` as its locals are cleared (CPython's gh-130794).

Invariants:
* Slot ``i`` holds a ``ThreadState`` whose ``slot == i``, or None.
* The slot list only grows, and is replaced only in a forked child. Scanners
  read it without a lock: a slot they read is a state that was registered at
  some instant during their read (see scan.py for why that is enough).
* Only ``add``, ``remove`` and the fork repair change it, under ``_lock``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import NotRegisteredError
from .thread_state import ExitSentinel, ThreadHandle, ThreadState

if TYPE_CHECKING:
    from .deferred import DeferredWork
    from .domain import Domain

__all__ = ["Registry"]


class Registry:
    """Registered threads in reusable slots, and how threads come and go."""

    __slots__ = ("_lock", "slots", "_free", "_count", "_tls", "_work", "__weakref__")

    def __init__(self, tls: threading.local, work: DeferredWork) -> None:
        """``tls``: the domain's thread-local; ``work``: where a departing
        thread's backlog goes."""
        self._tls = tls
        self._work = work
        self._lock: Any = threading.Lock()
        #: Slot i holds a ThreadState or None. Only grows; read without a lock.
        self.slots: list[ThreadState | None] = []
        self._free: list[int] = []
        self._count = 0

    def new_locks(self, factory: Callable[[], Any]) -> None:
        """Replace this part's lock with ``factory()`` (see Domain._new_locks)."""
        self._lock = factory()

    # -- threads joining and leaving ----------------------------------------

    def register(self, domain: Domain, wr_seq: int, handle_class: type[ThreadHandle]) -> ThreadState:
        """The calling thread joins, attached with seq = ``wr_seq`` (read by
        the caller just before: an older value is harmless, scans are capped
        at the wr_seq they began with). Its handle is a ``handle_class``."""
        tls = self._tls
        if getattr(tls, "state", None) is not None:
            raise RuntimeError(
                "this thread is already registered with this domain; "
                "call unregister() first, or use `with domain.registered():` once"
            )
        # seq is set before the state is published in a slot: a scanner
        # never sees this thread without it.
        state = ThreadState(domain, tls, wr_seq, handle_class)
        self.add(state)
        tls.state = state
        tls.report_to = state  # where the pure kernel's quiescent() stores (_pykernel.py)
        tls.sentinel = ExitSentinel(self.thread_exited, state)
        return state

    def unregister(self) -> None:
        """The calling thread leaves (see forget())."""
        tls = self._tls
        state = self.state_or_raise("unregister")
        tls.sentinel.armed = False
        del tls.sentinel, tls.report_to, tls.state
        self.forget(state)

    def forget(self, state: ThreadState) -> None:
        # Publish "detached" first (the kernel stores seq = 0, then marks the
        # state unregistered): a scanner holding an older slot list then
        # leaves this thread out instead of waiting on it, and the thread's
        # handle raises from now on.
        state._mark_unregistered()
        self.remove(state)
        # The domain takes the thread's backlog over, goals and all: it is
        # neither lost nor released before its goal is reached.
        self._work.adopt(state)

    def thread_exited(self, state: ThreadState) -> None:
        """Called by the thread's ExitSentinel when a registered thread ends."""
        if state.pid != os.getpid():
            # A thread of the parent, destroyed in a forked child: the
            # after-fork repair already rebuilt the registry without it.
            return
        self.forget(state)

    def state_or_raise(self, what: str) -> ThreadState:
        """The calling thread's state; NotRegisteredError naming ``what``."""
        try:
            state: ThreadState = self._tls.state
        except AttributeError:
            raise NotRegisteredError.for_call(what) from None
        return state

    # -- the slots -------------------------------------------------------------

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
