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
from dataclasses import dataclass
from operator import attrgetter

from .thread_state import ThreadState

__all__ = ["FlatRegistry", "ScanResult"]

_get_seq = attrgetter("seq")


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What one scan saw."""

    #: min(seq) over attached threads, or the wr_seq read before the scan
    #: when no thread is attached.
    min_seq: int
    #: How many attached threads were seen.
    attached: int
    #: Whether the only attached thread seen was the one passed as ``caller``.
    caller_alone: bool


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

    def scan(self, wr_seq: int, caller: ThreadState | None) -> ScanResult:
        """Compute the minimum seq over attached threads.

        ``wr_seq`` must have been read *before* this call: when no thread is
        attached the result is that value, and a value read later could
        cover a retirement made after the scan started.
        """
        states = self._states
        seqs = [s for s in map(_get_seq, states) if s]  # 0 = detached: excluded
        if not seqs:
            return ScanResult(wr_seq, 0, False)
        alone = len(seqs) == 1 and caller is not None and caller.seq != 0
        return ScanResult(min(seqs), len(seqs), alone)
