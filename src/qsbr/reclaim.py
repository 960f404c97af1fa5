"""Reclamation: the design's poll, and waiting for grace periods.

``poll(goal)``, as the design gives it:

1. If the goal (or, without one, the newest pending goal) is ahead of
   wr_seq, advance wr_seq first. A goal handed out by a deferred advance
   that nobody followed up would otherwise never be reached.
2. ``poll_scan``: the scanner computes the minimum ``seq`` over attached
   threads, capped at the wr_seq read before the scan began; it is
   published as ``rd_seq`` if it is larger. rd_seq never decreases.
3. Every pending release whose goal <= rd_seq is taken into a batch, under
   the deferred lists' lock, and run after that lock is released, so a
   release may itself retire or poll.

``synchronize()`` and ``barrier()`` are the waiting forms: they advance,
then scan whole passes until rd_seq reaches the target (or every release
scheduled before the call has run), backing off between scans. A
registered caller counts as quiescent while it waits: it holds nothing
across these calls.

Invariants:
* rd_seq only moves forward, under ``_lock`` (a compare-and-store: two
  pollers cannot move it backwards), and it is never ahead of wr_seq.
* A thread that is running releases is marked ``in_release`` (a per-thread
  flag): synchronize() and barrier() refuse to run there (they would wait
  for the release that is calling them), and retire() from a release never
  waits on the hard cap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ._unraisable import report_unraisable
from .deferred import Batch, DeferredWork, ErrorHandler
from .scan import Scanner
from .stall import StallDetector
from .thread_state import ThreadState
from .timing import GraceTiming

__all__ = ["Reclamation"]

_RELEASE_ERROR_MSG = "Exception ignored in a qsbr release of"


class Reclamation:
    """rd_seq, and running what it has made safe."""

    def __init__(
        self,
        *,
        work: DeferredWork,
        scanner: Scanner,
        timing: GraceTiming,
        stalls: StallDetector,
        read_wr_seq: Callable[[], int],
        advance: Callable[[], int],
        on_release_error: ErrorHandler | None,
        tls: threading.local,
    ) -> None:
        """``tls``: the domain's thread-local, where a thread running releases
        is marked (``tls.in_release``), so that the domain's own hot paths
        can test the mark without a call."""
        self.work = work
        self.scanner = scanner
        self._timing = timing
        self.stalls = stalls
        #: The domain's wr_seq and advance(), held weakly (see _weak.py).
        self.read_wr_seq = read_wr_seq
        self.advance_wr_seq = advance
        self._on_release_error = on_release_error
        #: min(seq) over attached threads as of the last completed scan.
        self.rd_seq = 1
        #: Completed scans, and times rd_seq moved forward.
        self.scans = 0
        self.grace_periods = 0
        self._lock: Any = threading.Lock()  # guards rd_seq and the counters
        self._local = tls

    def new_locks(self, factory: Callable[[], Any]) -> None:
        self._lock = factory()
        self.scanner.new_locks(factory)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self.scanner.after_fork_in_child()

    def in_release(self) -> bool:
        """Whether the calling thread is running releases now."""
        return getattr(self._local, "in_release", False)

    # -- poll ------------------------------------------------------------

    def poll(
        self,
        goal: int | None,
        caller: ThreadState | None,
        wr_seq: int,
        full: bool = False,
        quiescent: bool = False,
    ) -> bool:
        """The design's poll (see the module docstring). ``caller`` is the
        calling thread's state (None: not registered); ``wr_seq`` was read
        by the caller just before (an older value only makes the scan more
        conservative). ``full``: a whole pass, not one incremental step.
        ``quiescent``: the caller holds nothing now (it waits under a cap),
        which alone lets the not-shared fast path take its own list.

        Returns goal <= rd_seq; with no goal, whether nothing is left pending.
        """
        work = self.work
        want = work.newest_goal() if goal is None else goal
        if want > wr_seq:
            wr_seq = self.advance_wr_seq()
        rd, alone = self.poll_scan(caller, wr_seq, full)
        # Not shared: only for a caller at a quiescent state. A thread that
        # polls from retire() or poll() may still hold what it retired
        # itself (a view it just gave back, the old value of a Cell it read
        # earlier in the same request) until its next quiescent state.
        own = caller if alone and quiescent else None
        batch, waiting = work.take_ready(rd, not_shared=own, count_as_poll=True)
        if batch is not None:
            self.run_batch(batch)
        elif waiting:
            self.stalls.maybe_check()
            self.stalls.ensure_watchdog()
        if goal is None:
            # What was left when we took our batch (new retirements made
            # while it ran are not counted: they could not be ready yet).
            return waiting == 0
        return goal <= self.rd_seq

    def poll_scan(self, caller: ThreadState | None, wr_seq: int, full: bool = False) -> tuple[int, bool]:
        """Scan (a step of the pass, or a whole pass when ``full``); publish
        and return rd_seq, and whether the caller is the only attached
        thread. ``wr_seq`` must have been read before the call: it caps the
        result (see scan.py)."""
        min_seq, alone = self.scanner.scan(wr_seq, caller, full)
        if min_seq is None:  # no pass completed: rd_seq stays
            return self.rd_seq, False
        with self._lock:
            self.scans += 1
            # rd_seq never decreases: a thread that registered or attached
            # with an older wr_seq than the last scan saw cannot hold
            # anything that scan certified (see scan.py), so we keep the
            # larger value.
            if min_seq > self.rd_seq:
                self.rd_seq = min_seq
                self.grace_periods += 1
                self._timing.covered(min_seq)
            return self.rd_seq, alone

    # -- running releases ----------------------------------------------------

    def run_batch(self, batch: Batch) -> None:
        local = self._local
        outer = getattr(local, "in_release", False)
        local.in_release = True
        try:
            self.work.run(batch, self.report_error)
        finally:
            local.in_release = outer

    def run_one(self, obj: Any, release: Callable[[Any], Any]) -> None:
        """Run one release now, on this thread, counted as a release (the
        hard cap's object too big for any backlog: see admission.py)."""
        local = self._local
        outer = getattr(local, "in_release", False)
        local.in_release = True
        failed = False
        try:
            release(obj)
        except Exception as exc:
            failed = True
            self.report_error(exc, obj)
        finally:
            local.in_release = outer
            self.work.count_release(failed)

    def report_error(self, exc: BaseException, obj: Any) -> None:
        handler = self._on_release_error
        if handler is not None:
            try:
                handler(exc, obj)
                return
            except Exception as handler_exc:
                report_unraisable(handler_exc, handler, "Exception in qsbr on_release_error handler")
        report_unraisable(exc, obj, _RELEASE_ERROR_MSG)

    def refuse_in_release(self, what: str) -> None:
        if self.in_release():
            raise RuntimeError(
                f"{what}() was called from inside a release; it would wait for "
                "the release that is calling it and deadlock. Use retire()/defer() "
                "or poll() from a release instead."
            )

    # -- waiting ---------------------------------------------------------

    def synchronize(self, caller: ThreadState | None, timeout: float | None) -> bool:
        """Wait until every thread attached at the call has passed a
        quiescent state after it; False on timeout."""
        self.refuse_in_release("synchronize")
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.wait_for_grace_period(caller, deadline)

    def wait_for_grace_period(self, caller: ThreadState | None, deadline: float | None) -> bool:
        """Advance, then scan whole passes until rd_seq reaches the new
        wr_seq; False once ``deadline`` (time.monotonic()) has passed."""
        target = self.advance_wr_seq()
        # The caller is quiescent while it waits (it holds nothing across
        # this call); a detached caller stays detached.
        if caller is not None and caller.seq:
            caller.seq = target
        delay = 0.0
        while True:
            rd, _ = self.poll_scan(caller, self.read_wr_seq(), full=True)
            if rd >= target:
                if caller is not None and caller.seq:
                    caller.seq = self.read_wr_seq()
                return True
            self.stalls.maybe_check()  # a waiter is a path that already runs: stall.py
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                delay = min(delay, left)
            # Readers quiesce without any signal we could wait on, so back
            # off from a yield to at most 2 ms between scans.
            time.sleep(delay)
            delay = min(max(delay * 2, 5e-5), 2e-3)

    def barrier(self, caller: ThreadState | None, timeout: float | None) -> bool:
        """Wait until every release scheduled before the call has run;
        False on timeout."""
        self.refuse_in_release("barrier")
        deadline = None if timeout is None else time.monotonic() + timeout
        work = self.work
        # Every release scheduled before this line has goal <= wr_seq + 2.
        goal = self.read_wr_seq() + 2
        first = True
        while work.has_pending_up_to(goal):
            # First run what is ready already; after that, one grace period
            # from here reaches the goal (it advances past it).
            if not first and not self.wait_for_grace_period(caller, deadline):
                return False
            first = False
            rd, alone = self.poll_scan(caller, self.read_wr_seq(), full=True)
            batch, _ = work.take_ready(rd, not_shared=caller if alone else None)
            if batch is not None:
                self.run_batch(batch)
            # Other threads may be running batches that hold our releases.
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not work.wait_running(goal, left):
                return False
        return True
