"""Stall detection: naming the thread that holds reclamation back.

QSBR's one weakness is a thread that stays attached and never reports a
quiescent state: no release whose goal is past its ``seq`` can run, and the
backlog grows without bound (CPython's gh-132519, crossbeam-epoch's #566).
Like Linux's RCU stall warnings, a domain watches for it:

* A thread *holds reclamation back* when it is attached (``seq != 0``) and
  ``seq < min(oldest pending goal, wr_seq)``: some release waits for it, and
  it has not quiesced since wr_seq moved past its ``seq``.
* It has been *stalled for* the time since wr_seq first advanced past its
  ``seq`` (timing.py keeps the time of each advance not yet covered by
  rd_seq): that long it has not reported a quiescent state.
* It is reported when it has been stalled for ``stall_timeout`` seconds, or
  sooner, as soon as the bytes pending pass ``stall_bytes`` (64 MiB by
  default) once it has been stalled for ``BYTES_MIN_AGE`` (0.1 s: a reader
  in the middle of a request while a big model is swapped is not a stall).
  A report is a WARNING on the ``logging`` logger "qsbr" with the thread's
  name, ident, how long, how many grace periods behind, the backlog, and
  its current stack; then ``on_stall(report)`` if given.
* While the stall lasts the report repeats, backing off as Linux's RCU
  stall warnings do: report k+1 comes once the stall is 2**k times as old
  as the timeout, or the backlog 2**k times ``stall_bytes``, whichever is
  first. Each repeat carries the current backlog. A quiescent state (a new
  ``seq``) or a detach ends the stall.

When checks run. No thread is started behind the user's back: a check runs
on the paths that already run, at most every ``min(1 s, stall_timeout / 4)``
(one pass over the registered threads; never on quiescent()):
* a poll that finds work waiting (every deferred_limit-th retire() polls,
  and so does any poll());
* synchronize() and barrier() while they wait, and a retire() blocked at
  the hard cap;
* the background reclaimer (``Domain(background=True)``);
* the watchdog thread, only with ``Domain(watchdog=True)``.
So without a reclaimer or a watchdog, a stall goes unreported exactly when
no thread retires, polls or waits on the domain: nothing then calls into
it, and nothing pending grows either (the backlog grows only by retiring).

The detector reads the registry, the deferred work and the grace-period
times through those parts' own methods, and wr_seq through the callables
it is given; it holds no reference to the domain (so its watchdog thread,
which holds it weakly, ends once the domain is gone).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._unraisable import report_unraisable

if TYPE_CHECKING:
    from .deferred import DeferredWork
    from .registry import Registry
    from .thread_state import ThreadState
    from .timing import GraceTiming

__all__ = ["StallReport", "StallDetector", "logger", "BYTES_MIN_AGE"]

logger = logging.getLogger("qsbr")

#: Seconds a thread must have gone without a quiescent state before the byte
#: threshold alone makes it a stall.
BYTES_MIN_AGE = 0.1


@dataclass(frozen=True)
class StallReport:
    """One thread that holds reclamation back."""

    thread_name: str
    thread_ident: int
    #: The thread's seq (wr_seq at its last quiescent state) and wr_seq now.
    seq: int
    wr_seq: int
    #: Advances of wr_seq since its last quiescent state.
    grace_periods_behind: int
    #: Seconds since wr_seq first moved past its seq without it quiescing.
    stalled_for: float
    #: Its current Python stack (sys._current_frames), formatted; "" if gone.
    stack: str
    #: The backlog when the report was made: releases and bytes pending.
    pending: int = 0
    pending_bytes: int = 0
    #: 1 for the first report of this stall, 2 and up for its repeats.
    report: int = 1

    @property
    def name(self) -> str:
        """The thread's name (the same as thread_name)."""
        return self.thread_name

    @property
    def ident(self) -> int:
        """The thread's ident (the same as thread_ident)."""
        return self.thread_ident

    def message(self) -> str:
        again = f" (report {self.report}: the stall goes on)" if self.report > 1 else ""
        return (
            f"qsbr: thread {self.thread_name!r} (ident {self.thread_ident}) has not reported a "
            f"quiescent state for {self.stalled_for:.1f} s while releases wait on it{again}; it is "
            f"{self.grace_periods_behind} grace periods behind (seq {self.seq}, wr_seq {self.wr_seq}), "
            f"and {self.pending:,} releases ({self.pending_bytes:,} bytes) are pending. "
            "It must call quiescent() between uses of shared data, or detach() while it blocks "
            "(or read inside `with domain.attached():`). "
            f"Its stack:\n{self.stack}"
        )


def _stack_of(ident: int, frames: dict[int, Any]) -> str:
    frame = frames.get(ident)
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame))


class StallDetector:
    """The stall checks of one domain."""

    def __init__(
        self,
        timeout: float | None,
        on_stall: Callable[[StallReport], object] | None,
        *,
        stall_bytes: int | None,
        watchdog: bool,
        registry: Registry,
        work: DeferredWork,
        timing: GraceTiming,
        read_wr_seq: Callable[[], int],
        advance: Callable[[], int],
    ) -> None:
        self.timeout = timeout
        self.on_stall = on_stall
        self.stall_bytes = stall_bytes
        self.interval = 1.0 if timeout is None else min(1.0, timeout / 4)
        self._want_watchdog = watchdog and timeout is not None
        self._registry = registry
        self._work = work
        self._timing = timing
        self._read_wr_seq = read_wr_seq
        self._advance = advance
        # One checker at a time: two would report one stall twice.
        self._lock: Any = threading.Lock()
        self._next_check = 0.0
        self.reported = 0
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()

    def new_locks(self, factory: Callable[[], Any]) -> None:
        self._lock = factory()

    def after_fork_in_child(self) -> None:
        """The watchdog thread did not survive the fork."""
        self._lock = threading.Lock()
        self._watchdog = None  # started again by the next retirement or failed poll

    # -- checks ---------------------------------------------------------

    def maybe_check(self) -> None:
        """A check, unless one ran within the interval or is running."""
        if self.timeout is None or time.monotonic() < self._next_check:
            return
        if not self._lock.acquire(False):
            return
        try:
            self._check_locked(every_stack=False)
        finally:
            self._lock.release()

    def current(self) -> list[StallReport]:
        """Every thread stalled now (reported or not); reports new ones."""
        if self.timeout is None:
            return []
        with self._lock:
            return self._check_locked(every_stack=True)

    def holders(self, goal: int | None = None) -> list[StallReport]:
        """The attached threads that a release with ``goal`` (default: the
        oldest pending one) waits on, however long they have; no stacks."""
        oldest = self._work.oldest_goal() if goal is None else goal
        wr = self._read_wr_seq()
        need = min(oldest, wr) if oldest else 0
        now = time.monotonic()
        out = []
        for st in list(self._registry):
            seq = st.seq
            if seq and seq < need:
                since = self._timing.advanced_past(seq)
                out.append(_report(st, seq, wr, 0.0 if since is None else now - since, "", 0, 0, 1))
        return out

    def _due(self, age: float, nbytes: int, reports: int) -> bool:
        """Whether a stall this old, with this backlog, that has had
        ``reports`` reports, is due for another (see the module docstring)."""
        timeout = self.timeout
        assert timeout is not None
        limit = self.stall_bytes
        if not reports:
            return age >= timeout or (limit is not None and nbytes >= limit and age >= BYTES_MIN_AGE)
        scale = 1 << reports  # report 2 at twice the timeout (or bytes), report 3 at 4 times, ...
        return age >= timeout * scale or (limit is not None and nbytes >= limit * scale)

    def _check_locked(self, every_stack: bool) -> list[StallReport]:
        """One pass over the threads; reports the stalls that are due.
        Stacks are formatted for reports (they are logged), and for every
        stalled thread when ``every_stack``."""
        now = time.monotonic()
        self._next_check = now + (self.interval if self.timeout is not None else 1.0)
        oldest = self._work.oldest_goal()
        if not oldest:
            return []
        wr = self._read_wr_seq()
        if oldest > wr:
            # A goal nobody advanced to yet (deferred advance): poll would
            # advance too; without it no thread could ever be seen lagging.
            wr = self._advance()
        need = min(oldest, wr)
        counted = False
        pending = nbytes = 0
        stalled: list[tuple[ThreadState, StallReport, bool]] = []
        frames: dict[int, Any] | None = None  # every thread's frame, fetched once per check
        for st in list(self._registry):
            seq = st.seq
            if seq == 0 or seq >= need:  # detached, or not what releases wait on
                continue
            since = self._timing.advanced_past(seq)
            if since is None:
                continue
            age = now - since
            if not counted:  # the backlog, read once per check
                pending, nbytes = self._work.count(), self._work.count_bytes()
                counted = True
            reports = st.stall_reports if st.stall_seq == seq else 0
            due = self._due(age, nbytes, reports)
            if not due and not reports:  # not stalled (or not yet)
                continue
            want_stack = every_stack or due
            if want_stack and frames is None:
                frames = sys._current_frames()
            stack = _stack_of(st.ident, frames) if want_stack and frames is not None else ""
            rep = _report(st, seq, wr, age, stack, pending, nbytes, reports + 1 if due else reports)
            stalled.append((st, rep, due))
        for st, rep, due in stalled:
            if not due:
                continue
            if st.stall_seq != rep.seq:  # a new stall
                st.stall_seq = rep.seq
                self.reported += 1
            st.stall_reports = rep.report
            logger.warning("%s", rep.message())
            if self.on_stall is not None:
                try:
                    self.on_stall(rep)
                except Exception as exc:
                    report_unraisable(exc, self.on_stall, "Exception in qsbr on_stall callback")
        return [rep for _, rep, _ in stalled]

    # -- the watchdog thread ---------------------------------------------

    def ensure_watchdog(self) -> None:
        """Start the watchdog thread, if the domain asked for one and none runs."""
        if not self._want_watchdog or self._watchdog is not None or self._stop.is_set():
            return
        with self._lock:
            if self._watchdog is not None:
                return
            t = threading.Thread(target=_watch, args=(weakref.ref(self),), name="qsbr-watchdog", daemon=True)
            self._watchdog = t
            t.start()

    def stop(self) -> None:
        self._stop.set()
        t = self._watchdog
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5.0)


def _report(
    st: ThreadState,
    seq: int,
    wr: int,
    stalled_for: float,
    stack: str,
    pending: int,
    pending_bytes: int,
    report: int,
) -> StallReport:
    return StallReport(
        thread_name=st.name,
        thread_ident=st.ident,
        seq=seq,
        wr_seq=wr,
        grace_periods_behind=(wr - seq) // 2,
        stalled_for=stalled_for,
        stack=stack,
        pending=pending,
        pending_bytes=pending_bytes,
        report=report,
    )


def _watch(detector_ref: weakref.ReferenceType[StallDetector]) -> None:
    """The watchdog: a check every interval while the domain lives."""
    detector = detector_ref()
    while detector is not None:
        stop, interval = detector._stop, detector.interval
        del detector  # do not keep the detector (and its domain) alive while sleeping
        if stop.wait(interval):
            return
        detector = detector_ref()
        if detector is not None:
            try:
                detector.maybe_check()
            except ReferenceError:  # the domain went away during the check
                return
