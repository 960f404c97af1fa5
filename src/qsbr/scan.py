"""The scans that compute rd_seq from the thread registry (the design's poll_scan).

The design: "The minimum read sequence value across all active threads is
calculated and stored as the global rd_seq", leaving out detached threads.
Its "Limitations" section warns that scanning every thread "could become a
bottleneck ... (e.g., >1,000)" threads. This module offers two ways to
compute the minimum over the registry (registry.py):

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

Both read the registry's slot list without a lock.

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
from collections.abc import Callable
from typing import Any, Protocol

from .kernel import scan_slots
from .registry import Registry
from .thread_state import ThreadState

__all__ = ["FlatScan", "IncrementalScan", "SCAN_STRATEGIES", "Scanner"]


class Scanner(Protocol):
    """What Domain needs of an rd_seq strategy (a seam: tests inject broken
    ones through Domain._set_scanner)."""

    name: str

    def scan(self, wr_seq: int, caller: ThreadState | None, full: bool = False) -> tuple[int | None, bool]:
        """(the minimum seq over attached threads, capped at ``wr_seq``, when
        a pass completed in this call, else None; whether ``caller`` is the
        only attached thread, claimed only for a pass that began and ended
        in this call). ``wr_seq`` must have been read before the call."""
        ...

    def new_locks(self, factory: Callable[[], Any]) -> None: ...

    def after_fork_in_child(self) -> None: ...


class FlatScan:
    """The design's scan: every slot, every time."""

    name = "flat"

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def new_locks(self, factory: Callable[[], Any]) -> None:
        pass  # a flat scan keeps no state between polls

    def after_fork_in_child(self) -> None:
        pass

    def scan(self, wr_seq: int, caller: ThreadState | None, full: bool = False) -> tuple[int | None, bool]:
        """Return (min over attached threads capped at ``wr_seq``, whether
        ``caller`` is the only attached thread). ``wr_seq`` must have been
        read before this call (see the module docstring)."""
        slots = self.registry.slots
        lowest, _, attached = scan_slots(slots, 0, len(slots), wr_seq)
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
        #: Guards the pass state below: one poller advances the pass at a
        #: time (the others skip: a poll never waits on a scan).
        self._lock: Any = threading.Lock()
        self._forget_pass()

    def new_locks(self, factory: Callable[[], Any]) -> None:
        self._lock = factory()

    def after_fork_in_child(self) -> None:
        """The registry was rebuilt: a pass in progress means nothing now."""
        self._lock = threading.Lock()
        self._forget_pass()

    @property
    def in_pass(self) -> bool:
        """Whether a pass is spread across polls now (it began in an earlier call)."""
        return self._in_pass

    @property
    def cursor(self) -> int:
        """The slot the pass in progress examines next."""
        return self._cursor

    def _forget_pass(self) -> None:
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
            # The loads are the kernel's (in C: one copy of the step's slots,
            # a seq_cst fence, then acquire loads of each seq).
            lowest, found, seen = scan_slots(slots, start, end, lowest)
            attached += seen
            if found is not None:
                lowest_state = found
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


#: Domain(scan=...) names, first the default.
SCAN_STRATEGIES: dict[str, Callable[[Registry], Scanner]] = {"incremental": IncrementalScan, "flat": FlatScan}
