"""Deferred work: the design's "deferred-free list", one per thread.

As in CPython, every registered thread keeps its own list of pending
releases (``ThreadState.pending``); retire() appends to the caller's list
and takes no lock. A list is flat: three entries per release,

    [goal, fn, arg,  goal, fn, arg,  ...]      a release is fn(arg)

appended with one ``list.extend`` (a single atomic operation on the GIL and
the free-threaded build, so a reader of the list never sees a partial
triple). Pollers in any thread take *ready prefixes* of these lists (every
triple whose goal <= rd_seq) into a batch under ``_lock`` and run the batch
after releasing it, so a release may call retire() or poll() again.

Invariants:
* Only the owning thread appends to its list; only a poller holding
  ``_lock`` removes from it, and only from the front. So between the
  poller's ``buf[:j]`` and ``del buf[:j]`` the prefix cannot change.
  (The one shared list, ``_orphans``, for releases that retire on an
  unregistered thread, is appended to under ``_lock``, goal read included.)
* Goals in one list never decrease: one thread reads wr_seq, which only
  grows, in program order. So "the last goal is ready" means "all are", and
  the ready part of a list is a prefix found by binary search.
* A triple leaves a list only inside a batch, and a batch is run by one
  thread: each release runs exactly once.
* Pollers visit only threads that have retired something (``_writers``, a
  copy-on-write tuple a thread joins on its first retire()), never the
  readers, so a poll costs O(writers), not O(threads).
* When a thread leaves (unregister, thread exit, fork) its list is moved,
  whole, into ``_adopted`` under ``_lock``: the domain takes its backlog over
  (the bug of CPython's gh-130794 was losing it). Adopted lists keep their
  order and are polled like the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from .thread_state import ThreadState

__all__ = ["DeferredWork", "ErrorHandler", "call_no_arg", "Call"]

ErrorHandler = Callable[[BaseException, Any], None]


def call_no_arg(fn: Callable[[], Any]) -> None:
    """The release of a defer(fn) item: fn()."""
    fn()


class Call:
    """fn(*args, **kwargs) packed into one object for defer()."""

    __slots__ = ("fn", "args", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __call__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"<deferred call of {self.fn!r}>"


def _ready_prefix(buf: list[Any], n: int, rd_seq: int) -> int:
    """Length of the prefix of buf[:n] whose goals are <= rd_seq."""
    if buf[n - 3] <= rd_seq:  # goals never decrease: all ready
        return n
    lo, hi = 0, n // 3
    while lo < hi:
        mid = (lo + hi) // 2
        if buf[3 * mid] <= rd_seq:
            lo = mid + 1
        else:
            hi = mid
    return 3 * lo


class Batch:
    """Triples taken together; run by exactly one thread."""

    __slots__ = ("chunks", "remaining", "min_goal", "bid")

    def __init__(self, chunks: list[list[Any]], remaining: int, min_goal: int, bid: int) -> None:
        self.chunks = chunks
        self.remaining = remaining  # releases not yet run (counted per chunk)
        self.min_goal = min_goal
        self.bid = bid


class DeferredWork:
    """Every pending release of one domain, and the batches being run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batch_done = threading.Condition(self._lock)
        self._adopted: list[list[Any]] = []
        #: Threads that have retired something; replaced, never mutated.
        self._writers: tuple[ThreadState, ...] = ()
        #: Retirements made by releases running on unregistered threads (the
        #: reclaimer, an unregistered poller): goal and append under _lock.
        self._orphans: list[Any] = []
        self._running: dict[int, Batch] = {}
        self._waiters = 0  # threads in wait_running()
        self._next_batch_id = 0
        self.released = 0
        self.errors = 0
        self.max_pending = 0
        #: poll() calls (each ends in one take_ready), and those that found
        #: work pending but nothing ready.
        self.polls = 0
        self.failed_polls = 0

    def reset_after_fork(self, departed: Iterable[ThreadState]) -> None:
        """In a forked child: adopt the backlogs of threads that did not
        survive; batches other threads were running died with them."""
        self._lock = threading.Lock()
        self._batch_done = threading.Condition(self._lock)
        self._running.clear()
        self._waiters = 0
        for st in departed:
            self._adopt_locked(st)
        for st in self._writers:  # the survivor: its list is its own again
            st.listed = True

    # -- taking over a departing thread's backlog --------------------------

    def list_writer(self, state: ThreadState) -> None:
        """Called by a thread's first retire(): polls visit it from now on."""
        with self._lock:
            if not state.listed:
                state.listed = True
                self._writers = (*self._writers, state)

    def push_orphan(self, wr_seq: Callable[[], int], fn: Callable[[Any], Any], arg: Any) -> int:
        """Queue a release for a thread with no ThreadState (see _orphans).

        The goal (wr_seq + 2) is read and the triple appended under _lock, so
        goals in this shared list never decrease, as in a per-thread list."""
        with self._lock:
            goal = wr_seq() + 2
            orphans = self._orphans
            orphans.extend((goal, fn, arg))
            if not any(b is orphans for b in self._adopted):
                self._adopted.append(orphans)
            return goal

    def adopt(self, state: ThreadState) -> None:
        with self._lock:
            self._adopt_locked(state)

    def _adopt_locked(self, state: ThreadState) -> None:
        if state.listed:
            state.listed = False
            self._writers = tuple(w for w in self._writers if w is not state)
        buf, state.pending = state.pending, []
        if buf:
            self._adopted.append(buf)

    # -- observers ---------------------------------------------------------

    def pending(self) -> int:
        """Scheduled releases not yet run."""
        with self._lock:  # _running and _adopted change only under it
            n = 0
            for st in self._writers:
                n += len(st.pending)
            for buf in self._adopted:
                n += len(buf)
            n //= 3
            for b in self._running.values():
                n += b.remaining
            return n

    def newest_goal(self) -> int:
        """The largest goal pending (0 when nothing is). Unlocked, best effort."""
        newest = 0
        for st in self._writers:
            try:
                g = st.pending[-3]
            except IndexError:
                continue
            if g > newest:
                newest = g
        for buf in self._adopted[:]:
            try:
                g = buf[-3]
            except IndexError:
                continue
            if g > newest:
                newest = g
        return newest

    def has_pending_up_to(self, goal: int) -> bool:
        """Whether any release with goal <= ``goal`` is queued or running."""
        with self._lock:
            for buf in [st.pending for st in self._writers] + self._adopted:
                if buf and buf[0] <= goal:
                    return True
            return any(b.min_goal <= goal for b in self._running.values())

    def wait_running(self, goal: int, timeout: float | None) -> bool:
        """Wait until no running batch holds a release with goal <= ``goal``."""
        with self._lock:
            self._waiters += 1
            try:
                return self._batch_done.wait_for(
                    lambda: all(b.min_goal > goal for b in self._running.values()), timeout
                )
            finally:
                self._waiters -= 1

    # -- consumers -----------------------------------------------------------

    def take_ready(
        self, rd_seq: int, alone: ThreadState | None, is_poll: bool = False
    ) -> tuple[Batch | None, int]:
        """Take every release whose goal <= rd_seq into a new batch.

        Returns (the batch or None, how many releases are left pending
        besides it). ``alone`` is the design's "not shared" fast path: the
        caller is the only attached thread, so nobody can still hold what the
        caller itself unlinked and retired; its whole list is taken.
        """
        with self._lock:
            chunks: list[list[Any]] = []
            taken = waiting = min_goal = 0
            for buf in [st.pending for st in self._writers] + self._adopted:
                n = len(buf)  # the owner may append past n meanwhile
                if not n:
                    continue
                if buf[n - 3] <= rd_seq or (alone is not None and buf is alone.pending):
                    j = n  # goals never decrease: all of buf[:n] is ready
                else:
                    j = _ready_prefix(buf, n, rd_seq)
                    waiting += n - j
                    if not j:
                        continue
                chunk = buf[:j]
                del buf[:j]
                chunks.append(chunk)
                taken += j
                if chunk[0] < min_goal or not min_goal:
                    min_goal = chunk[0]
            if taken and self._adopted:
                self._adopted = [b for b in self._adopted if b]
            waiting //= 3
            for b in self._running.values():
                waiting += b.remaining
            if is_poll:
                self.polls += 1
                if not taken and waiting:
                    self.failed_polls += 1
            taken //= 3
            if waiting + taken > self.max_pending:
                self.max_pending = waiting + taken
            if not taken:
                return None, waiting
            bid = self._next_batch_id
            self._next_batch_id = bid + 1
            batch = self._running[bid] = Batch(chunks, taken, min_goal, bid)
            return batch, waiting

    def run(self, batch: Batch, on_error: ErrorHandler) -> int:
        """Run a taken batch, outside every lock; returns how many ran.

        A release that raises an Exception is reported through ``on_error``
        and the rest still run. A BaseException (KeyboardInterrupt,
        SystemExit) stops the batch: the releases not yet run go back, ahead
        of everything else, so nothing is lost; the exception propagates.
        """
        ran = errors = 0
        chunks = batch.chunks
        leftover: list[list[Any]] = []
        it: Any = None
        try:
            while chunks:
                chunk = chunks.pop(0)
                it = iter(chunk)
                for _goal, fn, arg in zip(it, it, it):  # noqa: B905 - triples by design
                    ran += 1
                    try:
                        fn(arg)
                    except Exception as exc:
                        errors += 1
                        on_error(exc, arg)
                it = None
                batch.remaining -= len(chunk) // 3
        except BaseException:
            # Only a BaseException from a release gets here: the one that
            # raised has run (and failed); the rest go back.
            rest = list(it) if it is not None else []
            leftover = ([rest] if rest else []) + chunks
            raise
        finally:
            with self._lock:
                if leftover:
                    self._adopted[:0] = leftover
                del self._running[batch.bid]
                self.released += ran
                self.errors += errors
                if self._waiters:  # notify_all is not free: only when barrier() waits
                    self._batch_done.notify_all()
        return ran
