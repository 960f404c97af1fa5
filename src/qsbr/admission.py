"""The hard cap on the backlog: ``Domain(max_pending=, max_pending_bytes=, on_full=)``.

With a cap, ``retire()`` first *reserves* room for the release (one item,
its size in bytes) under this part's lock, and the batch runner gives the
room back once the release has run. The reserved totals are therefore exact:
they bound what ``pending``/``pending_bytes`` can show, and they never pass
the cap, with two exceptions admitted on purpose (docs/api.md):

* a retirement made by a release: it cannot wait for the backlog its own
  batch belongs to;
* a retirement a structure (Cell, ...) makes for an unregistered writer.

When the room is not there, ``on_full`` decides:

* ``"block"``: the retiring thread reclaims and waits. It counts as
  quiescent while it waits (its ``seq`` is set to wr_seq on every round, as
  in synchronize()), polls itself (it may be the only writer), and sleeps on
  a condition that every batch notifies, backing off from 0.1 ms to 20 ms.
  A release bigger than ``max_pending_bytes`` can never fit: it waits for a
  grace period and is run by retire() itself.
* ``"raise"``: ``PendingLimitError``, naming the threads that hold
  reclamation back; nothing is queued.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .errors import PendingLimitError
from .reclaim import Reclamation
from .stall import StallDetector
from .thread_state import ThreadState

__all__ = ["Admission"]


class Admission:
    """The cap, what is reserved of it, and the writers that wait for room."""

    def __init__(
        self,
        *,
        max_pending: int | None,
        max_pending_bytes: int | None,
        on_full: str,
        reclaim: Reclamation,
        stalls: StallDetector,
        read_wr_seq: Callable[[], int],
        advance: Callable[[], int],
    ) -> None:
        self.cap_items = max_pending
        self.cap_bytes = max_pending_bytes
        self.on_full = on_full
        self._reclaim = reclaim
        self._stalls = stalls
        self._read_wr_seq = read_wr_seq
        self._advance = advance
        self.reserved_items = 0
        self.reserved_bytes = 0
        #: The most ever reserved: the exact peak of the backlog.
        self.peak_items = 0
        self.peak_bytes = 0
        #: retire() calls that waited for room, and those that raised.
        self.full_waits = 0
        self.limit_errors = 0
        self._space_waiters = 0
        self.new_locks(threading.Lock)

    def new_locks(self, factory: Callable[[], Any]) -> None:
        self._lock = factory()
        self._space = threading.Condition(self._lock)

    def after_fork_in_child(self) -> None:
        self.new_locks(threading.Lock)
        self._space_waiters = 0

    # -- reservations ------------------------------------------------------

    def try_reserve(self, size: int, force: bool = False) -> bool:
        """Reserve room for one release of ``size`` bytes; ``force`` admits
        it over the cap (the two exceptions in the module docstring)."""
        with self._lock:
            items = self.reserved_items + 1
            nbytes = self.reserved_bytes + size
            if not force and (
                (self.cap_items is not None and items > self.cap_items)
                or (self.cap_bytes is not None and nbytes > self.cap_bytes)
            ):
                return False
            self.reserved_items = items
            self.reserved_bytes = nbytes
            if nbytes > self.peak_bytes:
                self.peak_bytes = nbytes
            if items > self.peak_items:
                self.peak_items = items
            return True

    def freed(self, items: int, nbytes: int) -> None:
        """Releases ran (or a fork dropped them): their room is free again."""
        with self._lock:
            self.reserved_items -= items
            self.reserved_bytes -= nbytes
            if self._space_waiters:
                self._space.notify_all()

    def _wait_for_space(self, timeout: float) -> None:
        """Sleep until a batch frees something, or ``timeout`` seconds."""
        with self._lock:
            self._space_waiters += 1
            try:
                self._space.wait(timeout)
            finally:
                self._space_waiters -= 1

    # -- retire()'s side ---------------------------------------------------

    def admit(self, state: ThreadState, obj: Any, release: Callable[[Any], Any], size: int) -> int:
        """Make room under the cap for one release of ``size`` bytes.

        Returns 0 once room is reserved (the caller queues the release), or
        the goal of a release too big for the cap, which was run here after
        a grace period. Raises PendingLimitError when on_full="raise".
        """
        if self.try_reserve(size):
            return 0
        reclaim = self._reclaim
        if reclaim.in_release():
            # A release that retires cannot wait for reclamation: the batch
            # it runs in is part of the backlog it would wait on.
            self.try_reserve(size, force=True)
            return 0
        too_big = self.cap_bytes is not None and size > self.cap_bytes
        if not too_big:
            reclaim.poll(None, state, self._read_wr_seq(), full=True)  # reclaim what is ready, then retry
            if self.try_reserve(size):
                return 0
        if self.on_full == "raise":
            with self._lock:
                self.limit_errors += 1
                items, nbytes = self.reserved_items, self.reserved_bytes
            raise PendingLimitError(
                pending=items,
                pending_bytes=nbytes,
                size=size,
                max_pending=self.cap_items,
                max_pending_bytes=self.cap_bytes,
                holders=tuple(self._stalls.holders()),
            )
        with self._lock:
            self.full_waits += 1
        if too_big:
            # No backlog could hold it: wait for a grace period and release
            # it here. Nothing is lost and the cap is never passed.
            goal = self._advance()
            reclaim.wait_for_grace_period(state, None)
            reclaim.run_one(obj, release)
            return goal
        # Block: this thread counts as quiescent while it waits (like
        # synchronize()); it drives reclamation itself, since it may be
        # the only writer, and wakes when any batch frees something.
        attached = state.seq != 0
        delay = 1e-4
        try:
            while True:
                if attached:
                    state.seq = self._read_wr_seq()
                reclaim.poll(None, state, self._read_wr_seq(), full=True, quiescent=True)
                if self.try_reserve(size):
                    return 0
                self._stalls.maybe_check()
                self._wait_for_space(delay)
                delay = min(delay * 2, 0.02)
        finally:
            if attached:
                state.seq = self._read_wr_seq()
