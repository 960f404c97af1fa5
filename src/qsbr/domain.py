"""The QSBR domain: wr_seq, rd_seq, goals, polling, grace periods.

A ``Domain`` is the design's per-interpreter QSBR state, for Python code:

* ``wr_seq`` starts at 1 and advances by 2, so it is always odd;
* each registered thread copies ``wr_seq`` into its own ``seq`` at every
  quiescent state (``quiescent()``), and publishes 0 while detached;
* ``rd_seq`` is the minimum ``seq`` over attached threads as of the last
  scan, and never decreases;
* ``retire(obj, release)`` tags the object with a *goal* from
  ``deferred_advance()`` (``wr_seq + 2``, advancing only every
  ``deferred_limit``-th call of a thread) and queues it;
* ``poll()`` recomputes ``rd_seq`` and runs every release whose goal <= rd_seq.

Safety argument, in one paragraph (docs/design.md has it in full). A writer
unlinks R, then reads wr_seq = w and tags R with goal g = w + 2. Some thread
later advances wr_seq to g; that advance comes after the writer's read of w
in wr_seq's modification order, hence after the unlink. A reader whose
seq >= g copied a wr_seq value >= g, so its quiescent() ran after that
advance and therefore after the unlink; every use of R it made before was
finished (program order), and every later read finds the new value. A
detached reader (seq 0) holds nothing; when it attaches it copies wr_seq
first and reads shared data after. So once rd_seq >= g no attached thread
can hold R. Python-level loads and stores of attributes are sequentially
consistent under the GIL, and on free-threaded CPython attribute stores and
loads of an object's slots are atomic with release/acquire ordering at least
(docs/design.md: "Memory ordering"), which is what the chain above needs.
"""

from __future__ import annotations

import bisect
import contextlib
import operator
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from ._unraisable import report_unraisable
from .deferred import Call, DeferredWork, ErrorHandler, call_no_arg
from .errors import NotRegisteredError, PendingLimitError
from .scan import SCAN_STRATEGIES, Registry, Scanner
from .stall import StallDetector, StallReport
from .stats import DomainStats
from .thread_state import UNREGISTERED, ExitSentinel, ThreadHandle, ThreadState

__all__ = ["Domain", "default_domain"]

_RELEASE_ERROR_MSG = "Exception ignored in a qsbr release of"

#: Advances remembered for grace-period timing and stall ages; past this
#: many outstanding (rd_seq far behind), later ones are not timed.
_GP_STARTS_KEPT = 4096

#: The wr_seq value of a (wr_seq, time) entry of Domain._gp_starts.
_advance_value = operator.itemgetter(0)

#: type -> how to size its instances: 0 sys.getsizeof, 1 .nbytes, 2 len() (mmap).
_SIZE_KIND: dict[type, int] = {}


def _size_kind(t: type) -> int:
    if isinstance(getattr(t, "nbytes", None), (property, type(memoryview.nbytes))):
        kind = 1
    elif t.__name__ == "mmap" and t.__module__ == "mmap":
        kind = 2
    else:
        kind = 0
    _SIZE_KIND[t] = kind
    return kind


_getsizeof = sys.getsizeof


def estimate_size(obj: Any) -> int:
    """retire()'s default size: ``obj.nbytes`` for buffers (memoryview,
    numpy/array-like objects), ``len()`` for mmaps, else sys.getsizeof."""
    t = type(obj)
    kind = _SIZE_KIND.get(t)
    if kind is None:
        kind = _size_kind(t)
    if not kind:
        return sys.getsizeof(obj)
    if kind == 1:
        n = obj.nbytes
        if isinstance(n, int):
            return n
        return sys.getsizeof(obj)
    try:
        return len(obj)
    except ValueError:  # a closed mmap
        return 0


def _checked_size(size: Any) -> int:
    """retire()'s size= when it is not a plain int >= 0: accept int
    subclasses (numpy integers are not: use int()), refuse the rest."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an int >= 0 (bytes the release frees), got {size!r}")
    return int(size)


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


#: Every live domain, so that an os.fork() child can repair each of them.
_domains: weakref.WeakSet[Domain] = weakref.WeakSet()


class Domain:
    """A QSBR domain. See the module docstring and docs/api.md."""

    __slots__ = (
        "_wr_seq",
        "_rd_seq",
        "_tls",
        "_deferred_limit",
        "_lock",
        "_registry",
        "_scanner",
        "_work",
        "_on_release_error",
        "_reclaimer",
        "_reclaim_interval",
        "_closed",
        "_advances",
        "_scans",
        "_grace_periods",
        "_deferred_bytes",
        "_on_full",
        "_stalls",
        "_gp_starts",
        "_longest_gp",
        "_full_waits",
        "_limit_errors",
        "_capped",
        "__weakref__",
    )

    def __init__(
        self,
        *,
        deferred_limit: int = 10,
        scan: str = "incremental",
        background: bool = False,
        reclaim_interval: float = 0.005,
        on_release_error: ErrorHandler | None = None,
        deferred_bytes: int = 1 << 20,
        max_pending: int | None = None,
        max_pending_bytes: int | None = None,
        on_full: str = "block",
        stall_timeout: float | None = 10.0,
        on_stall: Callable[[StallReport], object] | None = None,
    ) -> None:
        """Create a domain.

        deferred_limit: a thread advances wr_seq on every deferred_limit-th
            deferred_advance()/retire(); the calls between share one goal.
        scan: how rd_seq is computed: "incremental" (default: a pass spread
            across polls, O(1) polls while a known laggard has not moved) or
            "flat" (the design's full scan on every poll). See scan.py.
        background: start a reclaimer thread that polls, so that writers never
            run releases themselves. Without it, retire() polls every
            deferred_limit-th call and any poll()/barrier() runs what is ready.
        reclaim_interval: how often the reclaimer polls while work is pending.
        on_release_error: called as on_release_error(exc, obj) when a release
            raises; by default the exception goes to sys.unraisablehook.
        deferred_bytes: a thread also advances wr_seq and polls once the
            bytes it retired since its last advance exceed this (1 MiB by
            default, as CPython 3.14), so one retirement bigger than it is
            processed at once.
        max_pending, max_pending_bytes: a hard cap on the backlog (releases,
            bytes; None = no cap). A retire() that would pass it blocks or
            raises, per on_full.
        on_full: "block" (the retiring thread reclaims and waits, counted as
            quiescent while it waits, until the release fits) or "raise"
            (PendingLimitError, nothing queued).
        stall_timeout: seconds an attached thread may go without a quiescent
            state while releases wait on it before it is reported as stalled
            (logger "qsbr", WARNING, once per stall); None turns it off.
        on_stall: also called as on_stall(report) for each new stall.
        """
        if isinstance(deferred_limit, bool) or not isinstance(deferred_limit, int):
            raise TypeError(f"deferred_limit must be an int >= 1, not {deferred_limit!r}")
        if deferred_limit < 1:
            raise ValueError(
                f"deferred_limit must be >= 1 (1 advances wr_seq on every retire), got {deferred_limit}"
            )
        if scan not in SCAN_STRATEGIES:
            raise ValueError(f"scan must be one of {sorted(SCAN_STRATEGIES)}, got {scan!r}")
        if not reclaim_interval > 0:
            raise ValueError(f"reclaim_interval must be > 0 seconds, got {reclaim_interval!r}")
        if on_release_error is not None and not callable(on_release_error):
            raise TypeError("on_release_error must be callable(exc, obj) or None")
        _check_count("deferred_bytes", deferred_bytes, minimum=1)
        if max_pending is not None:
            _check_count("max_pending", max_pending, minimum=1)
        if max_pending_bytes is not None:
            _check_count("max_pending_bytes", max_pending_bytes, minimum=1)
        if on_full not in ("block", "raise"):
            raise ValueError(f'on_full must be "block" or "raise", got {on_full!r}')
        if stall_timeout is not None and (
            isinstance(stall_timeout, bool)
            or not isinstance(stall_timeout, (int, float))
            or not stall_timeout > 0
        ):
            raise ValueError(
                "stall_timeout must be > 0 seconds, or None to turn stall detection off; "
                f"got {stall_timeout!r}"
            )
        if on_stall is not None and not callable(on_stall):
            raise TypeError("on_stall must be callable(report) or None")
        self._wr_seq = 1
        self._rd_seq = 1
        self._tls = threading.local()
        self._deferred_limit = deferred_limit
        # Guards wr_seq advances, rd_seq updates and the counters below.
        self._lock = threading.Lock()
        self._registry = Registry()
        self._scanner: Scanner = SCAN_STRATEGIES[scan](self._registry)
        self._work = DeferredWork(max_pending, max_pending_bytes)
        self._deferred_bytes = deferred_bytes
        self._capped = self._work.capped
        self._on_full = on_full
        self._stalls = StallDetector(None if stall_timeout is None else float(stall_timeout), on_stall)
        # (wr_seq value, time it was advanced to) for advances rd_seq has not
        # reached yet, oldest first; bounded by _GP_STARTS_KEPT (see advance()).
        self._gp_starts: list[tuple[int, float]] = []
        self._longest_gp = 0.0
        self._full_waits = 0
        self._limit_errors = 0
        self._on_release_error = on_release_error
        self._reclaim_interval = float(reclaim_interval)
        self._closed = False
        self._advances = 0
        self._scans = 0
        self._grace_periods = 0
        self._reclaimer: _Reclaimer | None = None
        _domains.add(self)
        if background:
            self._reclaimer = _Reclaimer(self)
            self._reclaimer.start()

    def __repr__(self) -> str:
        return (
            f"<qsbr.Domain wr_seq={self._wr_seq} rd_seq={self._rd_seq} "
            f"threads={len(self._registry)} pending={self.pending}>"
        )

    # -- sequence numbers ------------------------------------------------

    @property
    def wr_seq(self) -> int:
        """The global write sequence: starts at 1, +2 per advance, always odd."""
        return self._wr_seq

    @property
    def rd_seq(self) -> int:
        """min(seq) over attached threads as of the last scan; never decreases."""
        return self._rd_seq

    @property
    def deferred_limit(self) -> int:
        return self._deferred_limit

    @property
    def scan(self) -> str:
        """The rd_seq strategy: "incremental" or "flat"."""
        return self._scanner.name

    def advance(self) -> int:
        """wr_seq += 2; returns the new wr_seq."""
        with self._lock:
            # A read-modify-write: the lock makes concurrent advances add up.
            # The store publishes the new value to quiescent() readers, who
            # read it without a lock (a single atomic attribute load).
            self._wr_seq = new = self._wr_seq + 2
            self._advances += 1
            if len(self._gp_starts) < _GP_STARTS_KEPT:
                self._gp_starts.append((new, time.monotonic()))
        return new

    def _advanced_past(self, seq: int) -> float | None:
        """When wr_seq first advanced past ``seq`` (None: not since rd_seq
        passed it, or too long ago to be remembered)."""
        with self._lock:
            starts = self._gp_starts
            i = bisect.bisect_right(starts, seq, key=_advance_value)
            return starts[i][1] if i < len(starts) else None

    def deferred_advance(self) -> int:
        """The goal for a new retirement: wr_seq + 2 without advancing, except
        on every deferred_limit-th call of the calling thread, which advances
        and returns the new wr_seq."""
        state = getattr(self._tls, "state", None)
        if state is None:
            # Unregistered callers keep their count in the thread-local.
            tls = self._tls
            n = getattr(tls, "deferrals", 0) + 1
            if n < self._deferred_limit:
                tls.deferrals = n
                return self._wr_seq + 2
            tls.deferrals = 0
            return self.advance()
        n = state.deferrals + 1
        if n < self._deferred_limit:
            state.deferrals = n
            # Safe to hand out without advancing: whoever advances next
            # publishes this value, and poll() advances if nobody does.
            return self._wr_seq + 2
        state.deferrals = 0
        return self.advance()

    def _read_wr_seq(self) -> int:
        return self._wr_seq

    def goal_reached(self, goal: int) -> bool:
        """goal <= rd_seq, without scanning."""
        return goal <= self._rd_seq

    # -- registration ----------------------------------------------------

    def register(self) -> ThreadHandle:
        """The calling thread joins the domain, attached, with seq = wr_seq.

        Returns the thread's ThreadHandle, whose quiescent() is the cheap
        form of domain.quiescent() for hot loops (it belongs to this thread)."""
        tls = self._tls
        if getattr(tls, "state", None) is not None:
            raise RuntimeError(
                "this thread is already registered with this domain; "
                "call unregister() first, or use `with domain.registered():` once"
            )
        # seq = wr_seq is set before the state is published in the registry:
        # a scanner never sees this thread without it. (An old wr_seq read
        # here is harmless: scans are capped at the wr_seq they began with.)
        state = ThreadState(threading.get_ident(), threading.current_thread().name, self._wr_seq)
        state.handle = handle = ThreadHandle(self, state)
        self._registry.add(state)
        tls.state = state
        tls.q = state
        tls.sentinel = ExitSentinel(self, state)
        return handle

    def handle(self) -> ThreadHandle:
        """The calling thread's ThreadHandle (the one register() returned)."""
        handle = self._state_or_raise("handle").handle
        assert handle is not None
        return handle

    def unregister(self) -> None:
        """The calling thread leaves. What it retired stays queued, owned by
        the domain: never lost, never released early."""
        tls = self._tls
        state = self._state_or_raise("unregister")
        sentinel = tls.sentinel
        sentinel.armed = False
        del tls.sentinel, tls.q, tls.state
        self._forget(state)

    def _forget(self, state: ThreadState) -> None:
        # Publish "detached" first: a scanner holding an older registry
        # snapshot then leaves this thread out instead of waiting on it.
        state.seq = 0
        if state.handle is not None:
            state.handle.q = UNREGISTERED  # its quiescent() now raises
        self._registry.remove(state)
        # The domain takes the thread's backlog over, goals and all: it is
        # neither lost nor released before its goal is reached.
        self._work.adopt(state)

    def _thread_exited(self, state: ThreadState) -> None:
        """Called by ExitSentinel when a registered thread ends."""
        if state.pid != os.getpid():
            # A thread of the parent, destroyed in a forked child: the
            # after-fork hook already rebuilt the registry without it.
            return
        self._forget(state)

    def is_registered(self) -> bool:
        """Whether the calling thread is registered."""
        return getattr(self._tls, "state", None) is not None

    @contextlib.contextmanager
    def registered(self) -> Iterator[Domain]:
        """``with domain.registered():`` register on enter, unregister on exit."""
        self.register()
        try:
            yield self
        finally:
            self.unregister()

    def _state_or_raise(self, what: str) -> ThreadState:
        try:
            state: ThreadState = self._tls.state
        except AttributeError:
            raise NotRegisteredError(
                f"{what}() needs the calling thread to be registered: call "
                "domain.register() first (or use `with domain.registered():`)"
            ) from None
        return state

    # -- readers: quiescent states --------------------------------------

    def quiescent(self) -> None:
        """Report a quiescent state: the calling thread holds no reference
        to anything it read from shared structures. Takes no lock."""
        try:
            # One load of wr_seq, one store into this thread's own state (or
            # into its private sink while detached). Only this thread writes
            # that seq; scanners read it. The store is ordered after every
            # read of shared data this thread made before the call.
            self._tls.q.seq = self._wr_seq
        except AttributeError:
            raise NotRegisteredError(
                "quiescent() needs the calling thread to be registered: call "
                "domain.register() first (or use `with domain.registered():`)"
            ) from None

    def detach(self) -> None:
        """Leave rd_seq while blocking (I/O, sleep, waiting for work): the
        thread must hold no shared references until attach()."""
        state = self._state_or_raise("detach")
        # seq = 0 is stored after every read this thread made (program
        # order), so a scanner that sees 0 may ignore this thread.
        state.seq = 0
        self._tls.q = state.sink
        if state.handle is not None:
            state.handle.q = state.sink

    def attach(self) -> None:
        """Rejoin after detach(): seq = wr_seq, before any shared read."""
        state = self._state_or_raise("attach")
        state.seq = self._wr_seq
        self._tls.q = state
        if state.handle is not None:
            state.handle.q = state

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """``with domain.detached(): blocking_call()``"""
        state = self._state_or_raise("detached")
        was_attached = state.seq != 0
        self.detach()
        try:
            yield
        finally:
            if was_attached:
                self.attach()

    # -- writers: retiring -----------------------------------------------

    def retire(self, obj: Any, release: Callable[[Any], Any], *, size: int | None = None) -> int:
        """Schedule release(obj) for when no thread can still hold obj.

        Call it after obj is unlinked (no new reader can reach it). ``size``
        is the bytes the release frees (default: a cheap estimate, see
        estimate_size()). Returns the goal: ``poll(goal)`` /
        ``goal_reached(goal)`` tell when it is met.
        """
        if not callable(release):
            raise TypeError(
                f"release must be callable, e.g. retire(obj, obj.close); got {type(release).__name__}"
            )
        if size is None:
            # estimate_size(), with its common case inlined.
            size = _getsizeof(obj) if _SIZE_KIND.get(type(obj)) == 0 else estimate_size(obj)
        elif size.__class__ is not int or size < 0:  # the exact check first: it is the cheap one
            size = _checked_size(size)
        # Every writer's hot path: deferred_advance() and the append, inlined.
        try:
            state: ThreadState = self._tls.state
        except AttributeError:
            if getattr(self._tls, "in_release", False):
                # A release calling retire() on a thread that polls without
                # being registered (the reclaimer, an unregistered poller).
                return self._work.push_orphan(self._read_wr_seq, release, obj, size)
            raise NotRegisteredError(
                "retire()/defer() need the calling thread to be registered: call "
                "domain.register() first (or use `with domain.registered():`)"
            ) from None
        if self._capped:
            done = self._admit(state, obj, release, size)
            if done:  # too big for any backlog: released here, after a grace period
                return done
        if not state.listed:  # first retire of this thread: pollers must visit it
            self._work.list_writer(state)
            self._stalls.ensure_watchdog(self)
        # Counted before the append, so pending_bytes is never negative.
        state.retired_bytes = total = state.retired_bytes + size
        n = state.deferrals + 1
        if n < self._deferred_limit and total - state.bytes_at_advance <= self._deferred_bytes:
            state.deferrals = n
            # goal = wr_seq + 2 without advancing: whoever advances next
            # publishes it, and poll() advances if nobody does. The read of
            # wr_seq comes after the caller unlinked obj (program order).
            goal = self._wr_seq + 2
            state.pending.extend((goal, release, obj, size))  # one atomic append
            return goal
        # The deferred_limit-th retirement, or past the byte budget: advance
        # and process now (CPython 3.14's rule for deferred memory).
        state.deferrals = 0
        state.bytes_at_advance = total
        goal = self.advance()
        state.pending.extend((goal, release, obj, size))
        self._after_advance()
        return goal

    def _admit(self, state: ThreadState, obj: Any, release: Callable[[Any], Any], size: int) -> int:
        """Make room under the hard cap for one release of ``size`` bytes.

        Returns 0 once room is reserved (the caller queues the release), or
        the goal of a release too big for the cap, which was run here after
        a grace period. Raises PendingLimitError when on_full="raise".
        """
        work = self._work
        if work.try_reserve(size):
            return 0
        if getattr(self._tls, "in_release", False):
            # A release that retires cannot wait for reclamation: the batch
            # it runs in is part of the backlog it would wait on. Admitted
            # over the cap (documented in docs/api.md).
            work.try_reserve(size, force=True)
            return 0
        cap_bytes = work.cap_bytes
        too_big = cap_bytes is not None and size > cap_bytes
        if not too_big:
            self._poll(None, full=True)  # reclaim what is ready, then retry
            if work.try_reserve(size):
                return 0
        if self._on_full == "raise":
            with self._lock:
                self._limit_errors += 1
            items, nbytes = work.reserved()
            raise PendingLimitError(
                pending=items,
                pending_bytes=nbytes,
                size=size,
                max_pending=work.cap_items,
                max_pending_bytes=cap_bytes,
                holders=tuple(self._holders()),
            )
        with self._lock:
            self._full_waits += 1
        if too_big:
            # No backlog could hold it: wait for a grace period and release
            # it here. Nothing is lost and the cap is never passed.
            goal = self.advance()
            self._wait_for_grace_period(None)
            self._run_inline(obj, release)
            return goal
        # Block: this thread counts as quiescent while it waits (like
        # synchronize()); it drives reclamation itself, since it may be
        # the only writer, and wakes when any batch frees something.
        attached = state.seq != 0
        delay = 1e-4
        try:
            while True:
                if attached:
                    state.seq = self._wr_seq
                self._poll(None, full=True)
                if work.try_reserve(size):
                    return 0
                self._stalls.maybe_check(self)
                work.wait_for_space(delay)
                delay = min(delay * 2, 0.02)
        finally:
            if attached:
                state.seq = self._wr_seq

    def _run_inline(self, obj: Any, release: Callable[[Any], Any]) -> None:
        """Run one release now (see _admit); it never entered the backlog,
        so it counts as a release but not in the byte totals."""
        tls = self._tls
        outer = getattr(tls, "in_release", False)
        tls.in_release = True
        try:
            release(obj)
        except Exception as exc:
            with self._work._lock:
                self._work.errors += 1
            self._report_error(exc, obj)
        finally:
            tls.in_release = outer
            with self._work._lock:
                self._work.released += 1

    def _holders(self) -> list[StallReport]:
        """The attached threads that the oldest pending release waits on."""
        oldest = self._work.oldest_goal()
        wr = self._wr_seq
        need = min(oldest, wr) if oldest else 0
        now = time.monotonic()
        out = []
        for st in list(self._registry):
            seq = st.seq
            if seq and seq < need:
                since = self._advanced_past(seq)
                out.append(
                    StallReport(
                        thread_name=st.name,
                        thread_ident=st.ident,
                        seq=seq,
                        wr_seq=wr,
                        grace_periods_behind=(wr - seq) // 2,
                        stalled_for=0.0 if since is None else now - since,
                        stack="",
                    )
                )
        return out

    def _retire_any(self, obj: Any, release: Callable[[Any], Any], size: int | None = None) -> int:
        """retire() for the structures (Cell, ...), whose writers need not be
        registered. From an unregistered thread the release goes to the
        domain-owned list (goal read under its lock, after the caller's
        unlink), and the caller polls: nobody else may."""
        if getattr(self._tls, "state", None) is not None or getattr(self._tls, "in_release", False):
            return self.retire(obj, release, size=size)
        if not callable(release):
            raise TypeError(f"release must be callable, got {type(release).__name__}")
        goal = self._work.push_orphan(
            self._read_wr_seq, release, obj, estimate_size(obj) if size is None else size
        )
        self._stalls.ensure_watchdog(self)
        self._poll(None)
        return goal

    def defer(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> int:
        """Schedule fn(*args, **kwargs) like retire() schedules a release."""
        if not callable(fn):
            raise TypeError(f"defer() needs a callable, got {type(fn).__name__}")
        # Size 0: what a callback frees is unknown (use retire(..., size=)
        # when it matters for the byte budget).
        return self.retire(Call(fn, args, kwargs) if args or kwargs else fn, call_no_arg, size=0)

    def _after_advance(self) -> None:
        """Every deferred_limit-th retirement: let the reclaimer know, or,
        without one, poll here so pending work does not pile up."""
        reclaimer = self._reclaimer
        if reclaimer is not None and not self._closed:
            reclaimer.wake.set()
        elif not getattr(self._tls, "in_release", False):
            self._poll(None)

    # -- reclamation -----------------------------------------------------

    @property
    def pending(self) -> int:
        """Scheduled releases not yet run."""
        return self._work.pending()

    @property
    def pending_bytes(self) -> int:
        """Bytes the pending releases will free (the sizes given to retire())."""
        return self._work.pending_bytes()

    def stalled(self) -> list[StallReport]:
        """The threads stalled now: attached, holding releases back, and
        without a quiescent state for longer than stall_timeout (empty when
        stall detection is off). New stalls are reported as by the checks."""
        return self._stalls.current(self)

    def poll(self, goal: int | None = None) -> bool:
        """Recompute rd_seq and run every pending release whose goal <= rd_seq.

        Returns goal <= rd_seq; with no goal, whether nothing is left pending.
        """
        return self._poll(goal)

    def _poll(self, goal: int | None, full: bool = False) -> bool:
        work = self._work
        # A goal handed out by deferred_advance() may be wr_seq + 2 that
        # nobody has advanced to yet; no quiescent state could ever reach
        # it, so advance now.
        want = work.newest_goal() if goal is None else goal
        if want > self._wr_seq:
            self.advance()
        caller: ThreadState | None = getattr(self._tls, "state", None)
        rd, alone = self._scan(caller, full)
        batch, waiting = work.take_ready(rd, caller if alone else None, True)
        if batch is not None:
            self._run_batch(batch)
        elif waiting:
            stalls = self._stalls
            stalls.maybe_check(self)
            stalls.ensure_watchdog(self)
        if goal is None:
            # What was left when we took our batch (new retirements made
            # while it ran are not counted: they could not be ready yet).
            return waiting == 0
        return goal <= self._rd_seq

    def _scan(self, caller: ThreadState | None, full: bool = False) -> tuple[int, bool]:
        """Scan the threads (a step of the pass, or a whole pass when
        ``full``); publish and return rd_seq, and whether the caller is the
        only attached thread."""
        # wr_seq is read before the scan and caps its result (see scan.py).
        wr = self._wr_seq
        min_seq, alone = self._scanner.scan(wr, caller, full)
        if min_seq is None:  # no pass completed: rd_seq stays
            return self._rd_seq, False
        with self._lock:
            self._scans += 1
            # rd_seq never decreases: a thread that registered or attached
            # with an older wr_seq than the last scan saw cannot hold
            # anything that scan certified (see scan.py), so we keep the
            # larger value. Compare-and-store under the lock so that two
            # pollers cannot move it backwards.
            if min_seq > self._rd_seq:
                self._rd_seq = min_seq
                self._grace_periods += 1
                starts = self._gp_starts
                if starts and starts[0][0] <= min_seq:
                    # The oldest advance now covered took the longest.
                    took = time.monotonic() - starts[0][1]
                    if took > self._longest_gp:
                        self._longest_gp = took
                    del starts[: bisect.bisect_right(starts, min_seq, key=_advance_value)]
            rd = self._rd_seq
        return rd, alone

    def _run_batch(self, batch: Any) -> None:
        tls = self._tls
        outer = getattr(tls, "in_release", False)
        tls.in_release = True
        try:
            self._work.run(batch, self._report_error)
        finally:
            tls.in_release = outer

    def _report_error(self, exc: BaseException, obj: Any) -> None:
        handler = self._on_release_error
        if handler is not None:
            try:
                handler(exc, obj)
                return
            except Exception as handler_exc:
                report_unraisable(handler_exc, handler, "Exception in qsbr on_release_error handler")
        report_unraisable(exc, obj, _RELEASE_ERROR_MSG)

    def _refuse_in_release(self, what: str) -> None:
        if getattr(self._tls, "in_release", False):
            raise RuntimeError(
                f"{what}() was called from inside a release; it would wait for "
                "the release that is calling it and deadlock. Use retire()/defer() "
                "or poll() from a release instead."
            )

    def synchronize(self, timeout: float | None = None) -> bool:
        """Wait until every thread attached at the call has passed a
        quiescent state after it; False on timeout. A registered caller
        counts as quiescent while it waits."""
        self._refuse_in_release("synchronize")
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._wait_for_grace_period(deadline)

    def _wait_for_grace_period(self, deadline: float | None) -> bool:
        caller: ThreadState | None = getattr(self._tls, "state", None)
        target = self.advance()
        # The caller is quiescent while it waits (it holds nothing across
        # this call); a detached caller stays detached.
        if caller is not None and caller.seq:
            caller.seq = target
        delay = 0.0
        while True:
            rd, _ = self._scan(caller, full=True)
            if rd >= target:
                if caller is not None and caller.seq:
                    caller.seq = self._wr_seq
                return True
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                delay = min(delay, left)
            # Readers quiesce without any signal we could wait on, so back
            # off from a yield to at most 2 ms between scans.
            time.sleep(delay)
            delay = min(max(delay * 2, 5e-5), 2e-3)

    def barrier(self, timeout: float | None = None) -> bool:
        """Wait until every release scheduled before the call has run;
        False on timeout. A registered caller counts as quiescent."""
        self._refuse_in_release("barrier")
        deadline = None if timeout is None else time.monotonic() + timeout
        work = self._work
        # Every release scheduled before this line has goal <= wr_seq + 2.
        goal = self._wr_seq + 2
        caller: ThreadState | None = getattr(self._tls, "state", None)
        first = True
        while work.has_pending_up_to(goal):
            # First run what is ready already; after that, one grace period
            # from here reaches the goal (it advances past it).
            if not first and not self._wait_for_grace_period(deadline):
                return False
            first = False
            rd, alone = self._scan(caller, full=True)
            batch, _ = work.take_ready(rd, caller if alone else None)
            if batch is not None:
                self._run_batch(batch)
            # Other threads may be running batches that hold our releases.
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not work.wait_running(goal, left):
                return False
        return True

    # -- observability -----------------------------------------------------

    def stats(self) -> DomainStats:
        work = self._work
        states = list(self._registry)
        attached = sum(1 for s in states if s.seq)
        with self._lock:
            starts = self._gp_starts
            current_gp = time.monotonic() - starts[0][1] if starts and starts[0][0] > self._rd_seq else 0.0
            with work._lock:
                pending = work._pending_locked()
                pending_bytes = work._pending_bytes_locked()
                released = work.released
                released_bytes = work.released_bytes
                errors = work.errors
                polls, failed = work.polls, work.failed_polls
                max_pending = max(work.max_pending, pending)
                max_pending_bytes = max(work.max_pending_bytes, pending_bytes)
            return DomainStats(
                wr_seq=self._wr_seq,
                rd_seq=self._rd_seq,
                advances=self._advances,
                polls=polls,
                failed_polls=failed,
                scans=self._scans,
                grace_periods=self._grace_periods,
                retired=released + pending,
                releases=released,
                release_errors=errors,
                pending=pending,
                max_pending=max_pending,
                threads=len(states),
                attached=attached,
                detached=len(states) - attached,
                pending_bytes=pending_bytes,
                max_pending_bytes=max_pending_bytes,
                released_bytes=released_bytes,
                longest_grace_period=max(self._longest_gp, current_gp),
                current_grace_period=current_gp,
                stalls=self._stalls.reported,
                full_waits=self._full_waits,
                limit_errors=self._limit_errors,
            )

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Stop the background reclaimer, if any, and run what is ready.

        Releases still pending are not dropped: they run, once safe, at a
        later poll() or barrier() (the domain stays usable; retire() polls
        by itself again, as without a reclaimer)."""
        if self._closed:
            return
        self._closed = True
        reclaimer, self._reclaimer = self._reclaimer, None
        if reclaimer is not None:
            reclaimer.stop()
        self._stalls.stop()
        if not getattr(self._tls, "in_release", False):
            self._poll(None)

    def __enter__(self) -> Domain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _after_fork_child(self) -> None:
        """Only the forking thread survives a fork; keep its state alone."""
        self._lock = threading.Lock()
        me: ThreadState | None = getattr(self._tls, "state", None)
        if me is not None:
            me.pid = os.getpid()
        departed = [st for st in self._registry if st is not me]
        self._registry.reset(me)
        self._scanner.reset()
        self._work.reset_after_fork(departed)
        self._stalls.after_fork()
        if self._reclaimer is not None:
            # The reclaimer thread did not survive; start a fresh one.
            self._reclaimer = _Reclaimer(self)
            self._reclaimer.start()


class _Reclaimer:
    """The optional background thread that polls for a domain."""

    def __init__(self, domain: Domain) -> None:
        self._domain_ref = weakref.ref(domain)
        self._interval = domain._reclaim_interval
        self.wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qsbr-reclaimer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self.wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stopping:
            self.wake.wait(self._interval)
            self.wake.clear()
            domain = self._domain_ref()
            if domain is None:
                return
            if domain.pending:
                # A whole pass: this thread is on nobody's hot path.
                domain._poll(None, full=True)
                domain._stalls.maybe_check(domain)
            del domain  # do not keep the domain alive while sleeping


_default: Domain | None = None
_default_lock = threading.Lock()


def default_domain() -> Domain:
    """The process-wide domain, created on first use."""
    global _default
    d = _default
    if d is None:
        with _default_lock:
            if _default is None:
                _default = Domain()
            d = _default
    return d


def _after_fork_in_child() -> None:
    for d in list(_domains):
        d._after_fork_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
