"""The thread registry and the scan that computes rd_seq.

The design: "The minimum read sequence value across all active threads is
calculated and stored as the global rd_seq", leaving out detached threads.
This module keeps the set of registered threads and computes that minimum
with the design's flat scan: one pass over every thread state.

The registry is copy-on-write. register() and unregister() build a new tuple
under a lock and publish it with one attribute store; a scanner reads the
tuple once and then iterates it without any lock. A scanner may therefore see
a registry that is one update old, and that is safe:

* a thread missing from the snapshot registered after the snapshot was
  taken, so it copied wr_seq after the scan began and reads shared data only
  after that: every object whose goal the scan can certify was unlinked
  before that wr_seq was published, so the new thread cannot reach it;
* a thread still in the snapshot after it unregistered only makes the
  result smaller (more conservative), never larger.

Scanning costs O(threads); the design's "Limitations" section names this.
"""

from __future__ import annotations

import threading

from .thread_state import ThreadState

__all__ = ["FlatRegistry"]


class FlatRegistry:
    """Registered threads, scanned in full on every scan (the design's way)."""

    __slots__ = ("_lock", "_states")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Published snapshot; replaced, never mutated in place.
        self._states: tuple[ThreadState, ...] = ()

    def add(self, state: ThreadState) -> None:
        with self._lock:
            self._states = (*self._states, state)

    def remove(self, state: ThreadState) -> bool:
        """Remove ``state``; False when it was not registered."""
        with self._lock:
            states = self._states
            if state not in states:
                return False
            self._states = tuple(s for s in states if s is not state)
            return True

    def reset(self, keep: ThreadState | None) -> None:
        """After fork: only the forking thread survives in the child."""
        self._lock = threading.Lock()
        self._states = (keep,) if keep is not None else ()

    def states(self) -> tuple[ThreadState, ...]:
        return self._states

    def __len__(self) -> int:
        return len(self._states)

    def scan(self, wr_seq: int, caller: ThreadState | None) -> tuple[int, bool]:
        """Return (min seq over attached threads, whether ``caller`` is the
        only attached thread). With no thread attached, the minimum is
        ``wr_seq``.

        ``wr_seq`` must have been read *before* this call: when no thread is
        attached the result is that value, and a value read later could
        cover a retirement made after the scan started.
        """
        lowest = 0
        attached = 0
        for st in self._states:
            seq = st.seq
            if seq:  # 0 = detached: left out
                attached += 1
                if seq < lowest or not lowest:
                    lowest = seq
        if not attached:
            return wr_seq, False
        # The caller is registered, so it is in the snapshot: if it is
        # attached and only one thread is, that thread is the caller.
        return lowest, attached == 1 and caller is not None and caller.seq != 0
