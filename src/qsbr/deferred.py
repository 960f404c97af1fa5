"""Deferred work: the design's "deferred-free list", one per thread.

As in CPython, every registered thread keeps its own list of pending
releases (``ThreadState.deferred``); retire() appends to the caller's list
and takes no lock. A list is flat: four entries (an *entry*) per release,

    [goal, fn, arg, size,  goal, fn, arg, size,  ...]   a release is fn(arg)

appended with one ``list.extend`` (a single atomic operation on the GIL and
the free-threaded build, so a reader of the list never sees a partial
entry). ``size`` is the number of bytes the release frees, for the byte
budget. Pollers in any thread take *ready prefixes* of these lists (every
entry whose goal <= rd_seq) into a batch under ``_lock`` and run the batch
after releasing it, so a release may call retire() or poll() again.

Bytes are counted without a shared counter on the retire path: each thread
adds to its own ``retired_bytes`` (before it appends), the lock-holding
batch runner adds to ``released_bytes``, and the pending bytes are the
difference (never negative: a release is counted as retired before anyone
can take it). The hard cap (admission.py) is told what each batch freed.

Invariants:
* Only the owning thread appends to its list; only a poller holding
  ``_lock`` removes from it, and only from the front. So between the
  poller's ``buf[:j]`` and ``del buf[:j]`` the prefix cannot change. The
  one exception is the owner itself taking its whole list (take_ready's
  not-shared case): it takes the list object and gives itself a new one,
  under ``_lock``; it cannot be appending meanwhile.
  (The one shared list, ``_orphans``, for releases that retire on an
  unregistered thread, is appended to under ``_lock``, goal read included.)
* Lists hold whole entries: their length is a multiple of ENTRY, and every
  slice taken or deleted starts and ends on an entry boundary.
* Goals in one list never decrease: one thread reads wr_seq, which only
  grows, in program order. So "the last goal is ready" means "all are", and
  the ready part of a list is a prefix found by binary search.
* An entry leaves a list only inside a batch, and a batch is run by one
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

from .kernel import run_entries
from .thread_state import ThreadState

__all__ = ["DeferredWork", "WorkCounts", "ErrorHandler", "call_no_arg", "Call", "ENTRY"]

ErrorHandler = Callable[[BaseException, Any], object]
#: Told (releases, bytes) each time a batch has run, and what a fork dropped.
FreedHook = Callable[[int, int], None]

#: List slots per pending release: goal, fn, arg, size.
ENTRY = 4


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
    if buf[n - ENTRY] <= rd_seq:  # goals never decrease: all ready
        return n
    if buf[0] > rd_seq:  # none ready: a failed poll's common case, no search
        return 0
    lo, hi = 0, n // ENTRY
    while lo < hi:
        mid = (lo + hi) // 2
        if buf[ENTRY * mid] <= rd_seq:
            lo = mid + 1
        else:
            hi = mid
    return ENTRY * lo


class Batch:
    """Entries taken together; run by exactly one thread."""

    __slots__ = ("chunks", "remaining", "remaining_bytes", "min_goal", "bid")

    def __init__(self, chunks: list[list[Any]], remaining: int, min_goal: int, bid: int) -> None:
        self.chunks = chunks
        self.remaining = remaining  # releases not yet run (counted per chunk)
        self.remaining_bytes = sum(sum(c[3::ENTRY]) for c in chunks)
        self.min_goal = min_goal
        self.bid = bid


@dataclass(frozen=True)
class WorkCounts:
    """DeferredWork's counters, read together under its lock."""

    pending: int
    pending_bytes: int
    peak_pending: int
    peak_pending_bytes: int
    released: int
    released_bytes: int
    forgotten: int
    errors: int
    polls: int
    failed_polls: int


class DeferredWork:
    """Every pending release of one domain, and the batches being run."""

    def __init__(self) -> None:
        self._on_freed: FreedHook | None = None
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
        #: The largest backlog seen at a poll (the cap tracks its own, exact).
        self.peak_pending = 0
        self.peak_pending_bytes = 0
        #: poll() calls (each ends in one take_ready), and those that found
        #: work pending but nothing ready.
        self.polls = 0
        self.failed_polls = 0
        #: Bytes: retired by threads that have left (and by _orphans), and
        #: freed by releases that have run. See the module docstring.
        self.departed_bytes = 0
        self.released_bytes = 0
        #: Releases (and their bytes) a forked child will never run: those
        #: the parent was running at the fork, and with on_fork="drop" the
        #: whole backlog, whose entries stay referenced until the child exits.
        self.forgotten = 0
        self.forgotten_bytes = 0
        self.kept_until_exit: list[list[Any]] = []
        self.new_locks(threading.Lock)

    def new_locks(self, factory: Callable[[], Any]) -> None:
        """Replace this part's lock with ``factory()`` (see Domain._new_locks)."""
        self._lock = factory()
        self._batch_done = threading.Condition(self._lock)

    def set_freed_hook(self, on_freed: FreedHook) -> None:
        """``on_freed(releases, bytes)`` is told after each batch has run,
        outside the lock (the hard cap gives the room back)."""
        self._on_freed = on_freed

    def after_fork_in_child(self, departed: Iterable[ThreadState], drop: bool) -> None:
        """In a forked child: adopt the backlogs of threads that did not
        survive, or with ``drop`` forget every backlog (Domain(on_fork=)).
        Batches other threads were running ran in the parent, not here."""
        self.new_locks(threading.Lock)
        forgotten = forgotten_bytes = 0
        for b in self._running.values():
            forgotten += b.remaining
            forgotten_bytes += b.remaining_bytes
        self._running.clear()
        self._waiters = 0
        for st in departed:
            self._adopt_locked(st)
        for st in self._writers:  # the survivor: its list is its own again
            st.listed = True
        if drop:
            # The parent's releases are the parent's (a release may unlink a
            # file or return a block the parent still uses): none runs here.
            # Their objects stay referenced until this process exits, so no
            # finalizer of theirs runs early either.
            for buf in self._lists():
                forgotten += len(buf) // ENTRY
                forgotten_bytes += sum(buf[3::ENTRY])
                self.kept_until_exit.append(buf[:])
                del buf[:]
            self._adopted = []
            self._orphans = []
        self.forgotten += forgotten
        self.forgotten_bytes += forgotten_bytes
        if forgotten and self._on_freed is not None:
            self._on_freed(forgotten, forgotten_bytes)

    def _lists(self) -> Iterator[list[Any]]:
        """Every deferred-free list: the writers' own, then the adopted ones."""
        return chain([st.deferred for st in self._writers], self._adopted)

    # -- who retires, and taking over a departing thread's backlog --------

    def list_writer(self, state: ThreadState) -> None:
        """Called by a thread's first retire(): polls visit it from now on."""
        with self._lock:
            if not state.listed:
                state.listed = True
                self._writers = (*self._writers, state)

    def push_orphan(
        self, read_wr_seq: Callable[[], int], fn: Callable[[Any], Any], arg: Any, size: int
    ) -> int:
        """Queue a release for a thread with no ThreadState (see _orphans).

        The goal (wr_seq + 2) is read and the entry appended under _lock, so
        goals in this shared list never decrease, as in a per-thread list."""
        with self._lock:
            goal = read_wr_seq() + 2
            orphans = self._orphans
            self.departed_bytes += size
            orphans.extend((goal, fn, arg, size))
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
        buf, state.deferred = state.deferred, []
        # Its bytes now belong to the domain (the thread adds no more).
        self.departed_bytes += state.retired_bytes
        state.retired_bytes = 0
        if buf:
            self._adopted.append(buf)

    # -- observers ---------------------------------------------------------

    def count(self) -> int:
        """Scheduled releases not yet run."""
        with self._lock:  # _running and _adopted change only under it
            return self._count_locked()

    def _count_locked(self) -> int:
        n = sum(len(buf) for buf in self._lists()) // ENTRY
        for b in self._running.values():
            n += b.remaining
        return n

    def count_bytes(self) -> int:
        """Bytes the pending releases will free (sizes given to retire())."""
        with self._lock:
            return self._count_bytes_locked()

    def _count_bytes_locked(self) -> int:
        # released_bytes only moves under _lock, and every thread adds to its
        # retired_bytes before the entry can be taken: the difference is >= 0.
        retired = self.departed_bytes
        for st in self._writers:
            retired += st.retired_bytes
        return retired - self.released_bytes - self.forgotten_bytes

    def counts(self) -> WorkCounts:
        """Every counter, read together."""
        with self._lock:
            pending = self._count_locked()
            pending_bytes = self._count_bytes_locked()
            return WorkCounts(
                pending=pending,
                pending_bytes=pending_bytes,
                peak_pending=max(self.peak_pending, pending),
                peak_pending_bytes=max(self.peak_pending_bytes, pending_bytes),
                released=self.released,
                released_bytes=self.released_bytes,
                forgotten=self.forgotten,
                errors=self.errors,
                polls=self.polls,
                failed_polls=self.failed_polls,
            )

    def oldest_goal(self) -> int:
        """The smallest goal pending or running (0 when nothing is)."""
        with self._lock:
            oldest = 0
            for buf in self._lists():
                if buf and (not oldest or buf[0] < oldest):
                    oldest = buf[0]
            for b in self._running.values():
                if not oldest or b.min_goal < oldest:
                    oldest = b.min_goal
            return oldest

    def newest_goal(self) -> int:
        """The largest goal pending (0 when nothing is). Unlocked, best
        effort: a list read while an owner appends or a poller takes from it
        gives its old or its new last goal, both of which were pending."""
        newest = 0
        for st in self._writers:
            try:
                g = st.deferred[-ENTRY]
            except IndexError:
                continue
            if g > newest:
                newest = g
        adopted = self._adopted
        for i in range(len(adopted)):
            try:
                g = adopted[i][-ENTRY]
            except IndexError:  # emptied (or the list shrank) meanwhile
                continue
            if g > newest:
                newest = g
        return newest

    def has_pending_up_to(self, goal: int) -> bool:
        """Whether any release with goal <= ``goal`` is queued or running."""
        with self._lock:
            for buf in self._lists():
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
        self, rd_seq: int, *, not_shared: ThreadState | None = None, count_as_poll: bool = False
    ) -> tuple[Batch | None, int]:
        """Take every release whose goal <= rd_seq into a new batch.

        Returns (the batch or None, how many releases are left pending
        besides it). ``not_shared`` is the design's "not shared" fast path:
        the calling thread, when it is the only attached thread and at a
        quiescent state (in synchronize(), barrier(), or waiting under a
        cap); nobody, itself included, can still hold what it unlinked and
        retired, so its whole list is taken. ``count_as_poll``: count this
        call in polls/failed_polls.
        """
        with self._lock:
            chunks: list[list[Any]] | None = None
            taken = waiting = min_goal = 0
            own = not_shared.deferred if not_shared is not None else None
            for buf in self._lists():
                n = len(buf)  # the owner may append past n meanwhile
                if not n:
                    continue
                if buf[n - ENTRY] <= rd_seq or buf is own:
                    j = n  # goals never decrease: all of buf[:n] is ready
                else:
                    j = _ready_prefix(buf, n, rd_seq)
                    waiting += n - j
                    if not j:
                        continue
                if buf is own and j == n:
                    # The caller's own whole list: it is the owner, so it
                    # cannot be appending now; take the list itself and
                    # give the thread a new one (no copy of a long backlog).
                    chunk = buf
                    not_shared.deferred = []  # type: ignore[union-attr]
                else:
                    chunk = buf[:j]
                    del buf[:j]
                if chunks is None:
                    chunks = []
                chunks.append(chunk)
                taken += j
                if chunk[0] < min_goal or not min_goal:
                    min_goal = chunk[0]
            if taken and self._adopted:
                self._adopted = [b for b in self._adopted if b]
            waiting //= ENTRY
            for b in self._running.values():
                waiting += b.remaining
            if count_as_poll:
                self.polls += 1
                if not taken and waiting:
                    self.failed_polls += 1
            taken //= ENTRY
            if waiting + taken > self.peak_pending:
                self.peak_pending = waiting + taken
            if taken or waiting:
                nbytes = self._count_bytes_locked()
                if nbytes > self.peak_pending_bytes:
                    self.peak_pending_bytes = nbytes
            if chunks is None:
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
        ran = errors = freed = 0
        chunks = batch.chunks
        leftover: list[list[Any]] = []
        try:
            while chunks:
                chunk = chunks.pop(0)
                # The loop over the chunk is the kernel's (C on the native one).
                n, nbytes, nerr, stopped = run_entries(chunk, on_error)
                ran += n
                freed += nbytes
                errors += nerr
                batch.remaining -= n
                if stopped is not None:
                    # A BaseException from a release (or from on_error): the
                    # one that raised has run (and failed); the rest go back,
                    # whole entries, and the exception propagates.
                    rest = chunk[n * ENTRY :]
                    leftover = ([rest] if rest else []) + chunks
                    raise stopped
        finally:
            with self._lock:
                if leftover:
                    self._adopted[:0] = leftover
                del self._running[batch.bid]
                self.released += ran
                self.released_bytes += freed
                batch.remaining_bytes -= freed
                self.errors += errors
                if self._waiters:  # notify_all is not free: only when barrier() waits
                    self._batch_done.notify_all()
            if self._on_freed is not None and ran:
                self._on_freed(ran, freed)
        return ran

    def count_release(self, failed: bool) -> None:
        """Count a release that ran outside any batch: one too big for the
        hard cap, run by retire() itself (admission.py). It never entered a
        list, so it is not in the byte totals."""
        with self._lock:
            self.released += 1
            self.errors += failed
