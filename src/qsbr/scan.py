"""The thread registry, and the scans that compute rd_seq from it.

The design: "The minimum read sequence value across all active threads is
calculated and stored as the global rd_seq", leaving out detached threads.
Its "Limitations" section warns that scanning every thread "could become a
bottleneck ... (e.g., >1,000)" threads. This module keeps the registry and
offers two ways to compute the minimum:

``FlatScan`` (``Domain(scan="flat")``)
    The design's own: one pass over every thread on every poll. O(threads)
    per poll, kept so that the two can be compared.

``IncrementalScan`` (``Domain(scan="incremental")``, the default)
    The pass is spread across polls: each poll examines at most ``step``
    slots from a remembered cursor, keeping a running minimum, and publishes
    a result only when the pass reaches the end. And a poll that cannot
    succeed costs O(1): when the thread that held the last pass to its
    minimum (the *laggard*) has not moved since, a new pass could not find
    a larger minimum, so none is started.

The registry is a list of slots with a free list: register() and
unregister() are O(1) amortized, slots are reused (as CPython reuses thread
state slots), and 10,000 threads coming and going leave no garbage behind.
Scanners read the slot list without a lock.

Safety of a scan that runs while threads come and go (both strategies):

* Every pass first reads ``wr_seq`` (call it pass_wr) and starts its
  running minimum at that value, so its result is capped at pass_wr. A goal
  g <= pass_wr was reached before the pass began, so the object tagged with
  g was unlinked before the pass began.
* A thread the pass did not examine (it registered into a slot the pass had
  already passed, or after the pass read the slot list) registered after
  the pass began, so it reads shared data only after that unlink: it cannot
  hold the object. Without the cap this would be wrong: such a thread may
  have copied an old wr_seq, while every thread the pass did examine moved
  past g.
* A thread examined with seq >= g has passed a quiescent state after g was
  published (see domain.py); one seen detached (seq 0) holds nothing. Later
  changes can only raise its seq or detach it, never lower it below g.
* A thread the pass saw that has unregistered since only made the result
  smaller (more conservative), never larger.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from .thread_state import ThreadState

__all__ = ["Registry", "FlatScan", "IncrementalScan", "SCAN_STRATEGIES", "Scanner"]


class Registry:
    """Registered threads in reusable slots."""

    __slots__ = ("_lock", "slots", "_free", "_count")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Slot i holds a ThreadState or None. Only grows; read without a lock.
        self.slots: list[ThreadState | None] = []
        self._free: list[int] = []
        self._count = 0

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

    def reset(self, keep: ThreadState | None) -> None:
        """After fork: only the forking thread survives in the child."""
        self._lock = threading.Lock()
        self.slots = [keep] if keep is not None else []
        self._free = []
        self._count = 1 if keep is not None else 0
        if keep is not None:
            keep.slot = 0

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


class FlatScan:
    """The design's scan: every slot, every time."""

    name = "flat"

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def reset(self) -> None:
        pass

    def scan(self, wr_seq: int, caller: ThreadState | None, full: bool = False) -> tuple[int | None, bool]:
        """Return (min over attached threads capped at ``wr_seq``, whether
        ``caller`` is the only attached thread). ``wr_seq`` must have been
        read before this call (see the module docstring)."""
        lowest = wr_seq
        attached = 0
        for st in self.registry.slots:
            if st is not None:
                seq = st.seq
                if seq:  # 0 = detached: left out
                    attached += 1
                    if seq < lowest:
                        lowest = seq
        # The caller is registered, so the slot list holds it: if it is
        # attached and only one thread is, that thread is the caller.
        return lowest, attached == 1 and caller is not None and caller.seq != 0


class IncrementalScan:
    """A pass spread across polls, and O(1) polls while a laggard stays put."""

    name = "incremental"

    #: Slots examined per poll. A slot costs ~85 ns to examine on 3.13t
    #: (~30 ns on 3.11); 16 keeps a poll at 10,000 threads within 3x of one at
    #: 10 on both builds (benchmarks/bench_scale.py), and a pass takes n/16
    #: polls. synchronize(), barrier() and the reclaimer scan whole passes.
    STEP = 16

    def __init__(self, registry: Registry, step: int = STEP) -> None:
        if step < 1:
            raise ValueError("step must be >= 1")
        self.registry = registry
        self.step = step
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._in_pass = False
        self._cursor = 0
        self._lowest = 0
        self._lowest_state: ThreadState | None = None
        self._attached = 0
        # The thread that held the last completed pass to its minimum, and
        # the seq it had then.
        self._laggard: ThreadState | None = None
        self._laggard_seq = 0

    def scan(self, wr_seq: int, caller: ThreadState | None, full: bool = False) -> tuple[int | None, bool]:
        """Advance the pass by up to ``step`` slots (all of them when
        ``full``). Returns (the pass's result when it completed in this call,
        else None; whether the caller is the only attached thread, which is
        only claimed for a pass that began and ended within this call)."""
        if not self._lock.acquire(False):  # positional: cheaper than blocking=False
            return None, False  # another poller is scanning: let it
        try:
            fresh = not self._in_pass
            if fresh:
                laggard = self._laggard
                if (
                    laggard is not None
                    and laggard is not caller
                    and laggard.slot >= 0
                    and laggard.seq == self._laggard_seq
                ):
                    # The thread that held the last pass back has not passed
                    # a quiescent state (nor detached, nor left): no new pass
                    # could end higher. O(1).
                    return None, False
                # A new pass: its minimum starts at (is capped at) the
                # wr_seq read before this call. Pass state is stored only if
                # the pass does not end in this call (with few threads it
                # always does).
                start = 0
                lowest = wr_seq
                lowest_state: ThreadState | None = None
                attached = 0
            else:
                start = self._cursor
                lowest = self._lowest
                lowest_state = self._lowest_state
                attached = self._attached
            slots = self.registry.slots
            end = len(slots) if full else min(len(slots), start + self.step)
            # One C-level copy of the step's slots, then a loop over a list
            # this thread owns: on free-threaded 3.13, indexing the shared
            # list item by item costs an atomic reference per item.
            for st in slots[start:end]:
                if st is not None:
                    seq = st.seq
                    if seq:
                        attached += 1
                        if seq < lowest:
                            lowest = seq
                            lowest_state = st
            if end < len(slots):
                self._in_pass = True
                self._cursor = end
                self._lowest = lowest
                self._lowest_state = lowest_state
                self._attached = attached
                return None, False
            # The pass is complete.
            self._in_pass = False
            self._laggard = lowest_state
            self._laggard_seq = lowest if lowest_state is not None else 0
            alone = fresh and attached == 1 and caller is not None and caller.seq != 0
            return lowest, alone
        finally:
            self._lock.release()


Scanner = FlatScan | IncrementalScan
SCAN_STRATEGIES = {"flat": FlatScan, "incremental": IncrementalScan}
