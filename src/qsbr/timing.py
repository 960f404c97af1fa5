"""Grace-period times: when each advance of wr_seq happened.

Every advance of ``wr_seq`` is recorded with its time until ``rd_seq``
covers it. That answers two questions:

* how long a thread whose ``seq`` is s has gone without a quiescent state:
  since wr_seq first moved past s (``advanced_past(s)``, for stall reports);
* how long each grace period took: from an advance until rd_seq reached it
  (``longest``, and the age of the one in progress, for stats()).

The records live in two flat arrays, not in a list of (wr_seq, time)
tuples. While one thread holds every grace period up, advance() and polls
that fail run thousands of times; each tuple they left alive would count
towards the garbage collector's next collection, and on free-threaded 3.13
a collection walks the whole heap (with 10,000 threads, the poll that
triggers it takes milliseconds). Arrays hold plain numbers: no object a
collector tracks is made on the advance path.

Invariant: ``_seqs`` is sorted (wr_seq only grows, and advances are
recorded under the domain's advance lock, in order), and holds only values
rd_seq has not reached when ``covered`` last ran.
"""

from __future__ import annotations

import threading
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

__all__ = ["GraceTiming"]


class GraceTiming:
    """The times of the advances rd_seq has not reached yet."""

    #: Advances remembered; past this many outstanding (rd_seq far behind),
    #: later ones are not timed. Bounds the memory a stalled thread can make
    #: this part use.
    KEPT = 4096

    __slots__ = ("_lock", "_seqs", "_times", "longest")

    def __init__(self) -> None:
        self._lock: Any = threading.Lock()
        self._seqs = array("q")  # wr_seq values, ascending
        self._times = array("d")  # time.monotonic() of each advance
        #: Seconds: the longest grace period that has ended.
        self.longest = 0.0

    def new_locks(self, factory: Callable[[], Any]) -> None:
        self._lock = factory()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def advanced(self, wr_seq: int) -> None:
        """wr_seq was just advanced to ``wr_seq`` (called in advance order)."""
        with self._lock:
            if len(self._seqs) < self.KEPT:
                self._seqs.append(wr_seq)
                self._times.append(time.monotonic())

    def covered(self, rd_seq: int) -> None:
        """rd_seq moved forward to ``rd_seq``: the grace periods of the
        advances up to it have ended."""
        with self._lock:
            seqs = self._seqs
            if seqs and seqs[0] <= rd_seq:
                took = time.monotonic() - self._times[0]  # the oldest took longest
                if took > self.longest:
                    self.longest = took
                k = bisect_right(seqs, rd_seq)
                del seqs[:k]
                del self._times[:k]

    def advanced_past(self, seq: int) -> float | None:
        """When wr_seq first advanced past ``seq`` (None: not since rd_seq
        passed it, or too long ago to be remembered)."""
        with self._lock:
            i = bisect_right(self._seqs, seq)
            return self._times[i] if i < len(self._times) else None

    def current(self, rd_seq: int) -> float:
        """Seconds since the oldest advance rd_seq has not reached (0 if none)."""
        with self._lock:
            seqs = self._seqs
            return time.monotonic() - self._times[0] if seqs and seqs[0] > rd_seq else 0.0
