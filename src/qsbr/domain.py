"""The QSBR domain: the design's shared state and its per-thread operations.

A ``Domain`` is the design's per-interpreter QSBR state, for Python code:

* ``wr_seq`` starts at 1 and advances by 2, so it is always odd;
* each registered thread copies ``wr_seq`` into its own ``seq`` at every
  quiescent state (``quiescent()``), and publishes 0 while detached;
* ``rd_seq`` is the minimum ``seq`` over attached threads as of the last
  scan, and never decreases;
* ``retire(obj, release)`` tags the object with a *goal* from the deferred
  advance (``wr_seq + 2``, advancing only every ``deferred_limit``-th call of
  a thread) and queues it on the thread's own list;
* ``poll()`` recomputes ``rd_seq`` and runs every release whose goal <= rd_seq.

What readers call on every request is the kernel's: ``Domain`` subclasses
``kernel.DomainCore`` (in C, or pure Python: kernel.py), which holds
``wr_seq`` and the thread-local and implements ``quiescent``, ``attach``,
``detach``, ``attached`` and ``detached``. This module adds one small
method per remaining word of the design, as CPython's Python/qsbr.c has:
``advance``, ``deferred_advance`` (``_take_goal``), ``register``,
``unregister``, ``retire``, ``poll``. Everything else is a part it delegates
to, one module each (docs/design.md, "Module map"; assembly.py wires them).
retire() reaches release(obj) in two hops: retire -> Reclamation.poll
(reclaim.py) -> DeferredWork.take_ready/run (deferred.py) -> release(obj).

Why a release cannot run while a thread still holds the resource, and the
memory orderings that argument needs on both builds: docs/design.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _fork
from ._weak import weak_method
from .assembly import assemble
from .debug import PendingObjects
from .deferred import Call, ErrorHandler, call_no_arg
from .errors import NotRegisteredError
from .kernel import DomainCore, specialize
from .options import DomainOptions, check_int, check_release
from .reclaimer import ReclaimerThread
from .registry import Registry
from .scan import SCAN_STRATEGIES, Scanner
from .section import Registered
from .sizes import SIZERS, estimate_size
from .stall import StallReport
from .stats import DomainStats, snapshot
from .thread_state import CheckedThreadHandle, Deferrals, ThreadHandle, ThreadState

__all__ = ["Domain"]

#: How long retire() may skip polls that cannot find anything (see
#: _after_advance). The C twin tests poll_due, which only this module sets.
PINNED_POLL_NS = 1_000_000


class Domain(DomainCore):
    """A QSBR domain. See the module docstring and docs/api.md."""

    # wr_seq and the thread-local (_wr_seq, _tls) are the kernel's DomainCore.
    __slots__ = (
        "_deferred_limit",
        "_deferred_bytes",
        "_admission",
        "_parts",
        "_lock",
        "_registry",
        "_work",
        "_timing",
        "_stalls",
        "_reclaim",
        "_reclaimer",
        "_options",
        "_closed",
        "_debug",
        "_pending",
        "_handle_class",
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
        stall_bytes: int | None = 64 << 20,
        watchdog: bool = False,
        on_fork: str = "drop",
        debug: bool = False,
    ) -> None:
        """Create a domain. Every option is checked here; options.py says
        what each one means, and docs/api.md is the contract."""
        opts = DomainOptions.checked(
            deferred_limit=deferred_limit,
            scan=scan,
            scan_strategies=SCAN_STRATEGIES,
            background=background,
            reclaim_interval=reclaim_interval,
            on_release_error=on_release_error,
            deferred_bytes=deferred_bytes,
            max_pending=max_pending,
            max_pending_bytes=max_pending_bytes,
            on_full=on_full,
            stall_timeout=stall_timeout,
            on_stall=on_stall,
            stall_bytes=stall_bytes,
            watchdog=watchdog,
            on_fork=on_fork,
            debug=debug,
        )
        super().__init__()  # the kernel's part: wr_seq = 1
        self._options = opts
        self._tls = threading.local()
        self._deferred_limit = opts.deferred_limit
        self._deferred_bytes = opts.deferred_bytes
        self._closed = False
        self._debug = opts.debug
        #: Debug mode: what is retired and not yet released (debug.py).
        self._pending = PendingObjects() if opts.debug else None
        self._handle_class = CheckedThreadHandle if opts.debug else ThreadHandle
        # The parts, wired by assembly.py; the hot paths keep direct slots.
        parts = assemble(opts, self._tls, weak_method(self._read_wr_seq), weak_method(self.advance))
        self._parts = parts
        self._registry, self._work, self._timing = parts.registry, parts.work, parts.timing
        self._stalls, self._reclaim, self._admission = parts.stalls, parts.reclaim, parts.admission
        self._new_locks(threading.Lock)
        cls = type(self)
        self._configure(
            # The C fast path is the Python path for a plain domain; a cap,
            # debug mode or an overridden goal rule or advance() (tests'
            # mutants) take the Python path always.
            self._admission is None
            and self._pending is None
            and cls._take_goal is Domain._take_goal
            and cls._retire_python is Domain._retire_python
            and cls.advance is DomainCore.advance,
            self._deferred_limit,
            self._deferred_bytes,
            SIZERS,
            self._timing,
        )
        self._reclaimer: ReclaimerThread | None = None
        if opts.background:
            self._reclaimer = ReclaimerThread(self._reclaim, opts.reclaim_interval)
        _fork.track(self)

    def __repr__(self) -> str:
        return (
            f"<qsbr.Domain wr_seq={self._wr_seq} rd_seq={self.rd_seq} "
            f"threads={len(self._registry)} pending={self.pending}>"
        )

    # -- sequence numbers ------------------------------------------------

    @property
    def wr_seq(self) -> int:
        """The global write sequence: starts at 1, +2 per advance, always odd."""
        return self._wr_seq

    def _read_wr_seq(self) -> int:
        return self._wr_seq

    @property
    def rd_seq(self) -> int:
        """min(seq) over attached threads as of the last scan; never decreases."""
        return self._reclaim.rd_seq

    @property
    def deferred_limit(self) -> int:
        return self._deferred_limit

    @property
    def scan(self) -> str:
        """The rd_seq strategy: "incremental" or "flat"."""
        return self._reclaim.scanner.name

    # advance() is the kernel's (DomainCore): wr_seq += 2 and the time of
    # it recorded (timing.py), together; it returns the new wr_seq.

    def deferred_advance(self) -> int:
        """The goal for a new retirement: wr_seq + 2 without advancing, except
        on every deferred_limit-th call of the calling thread, which advances
        and returns the new wr_seq."""
        tls = self._tls
        counter = getattr(tls, "state", None)
        if counter is None:  # an unregistered caller keeps its count in the thread-local
            counter = getattr(tls, "deferrals", None)
            if counter is None:
                counter = tls.deferrals = Deferrals()
        return self._take_goal(counter)

    def _take_goal(self, counter: ThreadState | Deferrals) -> int:
        """The design's deferred advance; the one copy of its rule.

        A retirement's goal is wr_seq + 2, without advancing, except on the
        thread's deferred_limit-th retirement since its last advance, or once
        the bytes it retired since then exceed deferred_bytes (CPython
        3.14's rule for deferred memory): then wr_seq advances, and the goal
        is the new value. ``counter.deferrals`` is 0 afterwards exactly when
        this call advanced (retire() then polls).

        Why wr_seq + 2 is safe to hand out without advancing: it is a value
        wr_seq has not reached, so no thread can have copied it before the
        retirement; whoever advances next publishes it, and poll() advances
        if nobody does. The caller unlinked the object before this read
        (program order). A seam: test mutants override this method.
        """
        n = counter.deferrals + 1
        if (
            n < self._deferred_limit
            and counter.retired_bytes - counter.bytes_at_advance <= self._deferred_bytes
        ):
            counter.deferrals = n
            return self._wr_seq + 2
        counter.deferrals = 0
        counter.bytes_at_advance = counter.retired_bytes
        return self.advance()

    def goal_reached(self, goal: int) -> bool:
        """goal <= rd_seq, without scanning."""
        return goal <= self._reclaim.rd_seq

    # -- registration ----------------------------------------------------

    def register(self) -> ThreadHandle:
        """The calling thread joins the domain, attached, with seq = wr_seq.

        Returns the thread's ThreadHandle, whose quiescent() is the cheap
        form of domain.quiescent() for hot loops (it belongs to this thread)."""
        return self._registry.register(self, self._wr_seq, self._handle_class).handle

    def handle(self) -> ThreadHandle:
        """The calling thread's ThreadHandle (the one register() returned)."""
        handle = self._registry.state_or_raise("handle").handle
        assert handle is not None
        return handle

    def unregister(self) -> None:
        """The calling thread leaves. What it retired stays queued, owned by
        the domain: never lost, never released early."""
        self._registry.unregister()

    def is_registered(self) -> bool:
        """Whether the calling thread is registered."""
        return getattr(self._tls, "state", None) is not None

    def registered(self) -> Registered:
        """``with domain.registered():`` register on enter, unregister on exit."""
        return Registered(self)

    # -- readers: quiescent states --------------------------------------

    # quiescent(), attach(), detach(), attached() and detached() are the
    # kernel's (DomainCore):
    # they find the calling thread's state without Python code on the hot
    # path, and call _thread_core() when they cannot.

    def _thread_core(self, what: str) -> ThreadState:
        """The calling thread's state, for the kernel's calls named ``what``:
        NotRegisteredError if it is not registered, except for "attached",
        which registers it first (detached: what a read section leaves the
        thread as between blocks)."""
        state: ThreadState | None = getattr(self._tls, "state", None)
        if state is not None:
            return state
        if what != "attached":
            raise NotRegisteredError.for_call(what)
        state = self._registry.register(self, self._wr_seq, self._handle_class)
        state.detach()
        return state

    def is_attached(self) -> bool:
        """Whether the calling thread is registered and attached: whether
        what it reads from shared structures is protected now."""
        state = getattr(self._tls, "state", None)
        return state is not None and state.seq != 0

    @property
    def debug(self) -> bool:
        """Whether debug mode is on (Domain(debug=True) or QSBR_DEBUG=1)."""
        return self._debug

    # -- writers: retiring -----------------------------------------------

    def _retire_python(self, obj: Any, release: Callable[[Any], Any], *, size: int | None = None) -> int:
        """Schedule release(obj) for when no thread can still hold obj.

        Call it after obj is unlinked (no new reader can reach it). ``size``
        is the bytes the release frees (default: a cheap estimate, see
        estimate_size()). Returns the goal: ``poll(goal)`` /
        ``goal_reached(goal)`` tell when it is met.
        """
        if not callable(release):
            check_release(release)  # raises, with a hint
        if size is None:
            sizer = SIZERS.get(type(obj))  # estimate_size(), without its call
            if sizer.__class__ is int:  # a type whose instances have one size
                size = sizer
            else:
                size = sizer(obj) if sizer is not None else estimate_size(obj)  # type: ignore[operator]
        elif size.__class__ is not int or size < 0:  # the exact check first: it is the cheap one
            size = check_int("size", size, 0, "bytes the release frees")
        if self._pending is not None and release is not call_no_arg:  # defer(fn) may run fn twice
            release = self._pending.track(obj, release)
        try:
            state: ThreadState = self._tls.state
        except AttributeError:
            return self._retire_unregistered(obj, release, size)
        admission = self._admission
        if admission is not None:
            done = admission.admit(state, obj, release, size)
            if done:  # too big for any backlog: released here, after a grace period
                return done
        if not state.listed:  # first retire of this thread: pollers must visit it
            self._work.list_writer(state)
            self._stalls.ensure_watchdog()
        # Counted before the append, so the pending bytes are never negative.
        state.retired_bytes += size
        goal = self._take_goal(state)
        state.deferred.extend((goal, release, obj, size))  # one atomic append
        if not state.deferrals:  # _take_goal advanced: process now
            self._after_advance(state)
        return goal

    # retire() is this Python method on the pure kernel; the C kernel
    # replaces it (specialize() below) with its fast path for the common case
    # (_kernel.c, I6), which calls _retire_python for every other case.
    retire = _retire_python

    def _retire_unregistered(self, obj: Any, release: Callable[[Any], Any], size: int) -> int:
        if self._reclaim.in_release():
            # A release calling retire() on a thread that polls without
            # being registered (the reclaimer, an unregistered poller).
            return self._push_orphan(obj, release, size)
        raise NotRegisteredError.for_call("retire")

    def _retire_from_any_thread(
        self, obj: Any, release: Callable[[Any], Any], size: int | None = None
    ) -> int:
        """retire() for the structures (Cell, ...), whose writers need not be
        registered. From an unregistered thread the release goes to the
        domain-owned list (goal read under its lock, after the caller's
        unlink), and the caller polls: nobody else may."""
        if getattr(self._tls, "state", None) is not None or self._reclaim.in_release():
            return self.retire(obj, release, size=size)
        check_release(release)
        size = estimate_size(obj) if size is None else check_int("size", size, 0, "bytes the release frees")
        if self._pending is not None:
            release = self._pending.track(obj, release)
        goal = self._push_orphan(obj, release, size)
        self._stalls.ensure_watchdog()
        self._reclaim.poll(None, None, self._wr_seq)
        return goal

    def _check_not_pending(self, obj: Any) -> None:
        """Debug mode: ValueError if ``obj`` is waiting to be released (for
        Cell, before it unpublishes a value: debug.py)."""
        if self._pending is not None:
            self._pending.check(obj)

    def _push_orphan(self, obj: Any, release: Callable[[Any], Any], size: int) -> int:
        if self._admission is not None:  # admitted over the cap: see admission.py
            self._admission.try_reserve(size, force=True)
        return self._work.push_orphan(self._read_wr_seq, release, obj, size)

    def defer(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> int:
        """Schedule fn(*args, **kwargs) like retire() schedules a release."""
        if not callable(fn):
            raise TypeError(f"defer() needs a callable, got {type(fn).__name__}")
        # Size 0: what a callback frees is unknown (use retire(..., size=)
        # when it matters for the byte budget).
        return self.retire(Call(fn, args, kwargs) if args or kwargs else fn, call_no_arg, size=0)

    def _after_advance(self, state: ThreadState) -> None:
        """Every deferred_limit-th retirement: let the reclaimer know, or,
        without one, poll here so pending work does not pile up.

        Except when that poll cannot find anything (the C twin makes the same
        test before it calls this; _kernel.c, I7): the caller is attached,
        and its seq is the one with which its last poll from here found
        rd_seq where the caller's own seq holds it. rd_seq is a minimum over
        attached threads, the caller among them, so until the caller's next
        quiescent state no scan can move it, and nothing can be ready: that
        poll took every entry with goal <= rd_seq, and every goal handed out
        since is above it. A writer that retires many objects between two
        quiescent states would otherwise pay a failed poll (several
        microseconds) every deferred_limit retirements. A poll still runs
        once ``poll_due`` has passed (stall checks; releases that a
        KeyboardInterrupt put back)."""
        seq = state.seq
        if seq and seq == state.pinned_seq and time.monotonic_ns() < state.poll_due:
            self._count_skipped_poll()  # counted as a failed poll: see stats()
            return
        reclaimer = self._reclaimer
        if reclaimer is not None and not self._closed:
            reclaimer.wake()
        elif not getattr(self._tls, "in_release", False):  # Reclamation marks it (reclaim.py)
            reclaim = self._reclaim
            reclaim.poll(None, state, self._wr_seq)
            seq = state.seq
            state.pinned_seq = seq if seq and seq <= reclaim.rd_seq else 0
            state.poll_due = time.monotonic_ns() + PINNED_POLL_NS

    # -- reclamation -----------------------------------------------------

    @property
    def pending(self) -> int:
        """Scheduled releases not yet run."""
        return self._work.count()

    @property
    def pending_bytes(self) -> int:
        """Bytes the pending releases will free (the sizes given to retire())."""
        return self._work.count_bytes()

    def poll(self, goal: int | None = None) -> bool:
        """Recompute rd_seq and run every pending release whose goal <= rd_seq.

        Returns goal <= rd_seq; with no goal, whether nothing is left pending.
        """
        return self._reclaim.poll(goal, getattr(self._tls, "state", None), self._wr_seq)

    def synchronize(self, timeout: float | None = None) -> bool:
        """Wait until every thread attached at the call has passed a
        quiescent state after it; False on timeout. A registered caller
        counts as quiescent while it waits."""
        return self._reclaim.synchronize(getattr(self._tls, "state", None), timeout)

    def barrier(self, timeout: float | None = None) -> bool:
        """Wait until every release scheduled before the call has run;
        False on timeout. A registered caller counts as quiescent."""
        return self._reclaim.barrier(getattr(self._tls, "state", None), timeout)

    def stalled(self) -> list[StallReport]:
        """The threads stalled now: attached, holding releases back, and
        without a quiescent state for longer than stall_timeout (empty when
        stall detection is off). New stalls are reported as by the checks."""
        return self._stalls.current()

    def holding_back(self, goal: int | None = None) -> list[StallReport]:
        """The attached threads that a release with ``goal`` waits on (by
        default the oldest pending release): they have not passed a
        quiescent state since wr_seq moved past their seq. No stacks."""
        return self._stalls.holders(goal)

    def stats(self) -> DomainStats:
        return snapshot(self._wr_seq, self._advances, self._skipped_polls, self._parts)

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
        if not self._reclaim.in_release():
            self.poll()

    def __enter__(self) -> Domain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- seams: fork repair, locks, the scanner ----------------------------

    def _new_locks(self, factory: Callable[[], Any]) -> None:
        """(Re)create every lock of the domain and its parts with
        ``factory()``: __init__ and the after-fork repair use
        threading.Lock, tests/interleave.py a lock its scheduler can see."""
        self._lock = factory()
        self._parts.new_locks(factory)

    def _set_scanner(self, make: Callable[[Registry], Scanner]) -> None:
        """Compute rd_seq with ``make(registry)`` from now on (a seam for
        tests, which inject broken scanners; not for programs)."""
        self._reclaim.scanner = make(self._registry)

    def _after_fork_in_child(self) -> None:
        """In a child of os.fork() (called by _fork): only the forking
        thread survives, so only its registration is kept; the other
        threads' backlogs are adopted; every lock is new."""
        me: ThreadState | None = getattr(self._tls, "state", None)
        if me is not None:
            me.pid = os.getpid()
        self._lock = threading.Lock()
        drop = self._options.on_fork == "drop"
        self._parts.after_fork_in_child(me, drop)
        if drop and self._pending is not None:
            self._pending.clear()
        if self._reclaimer is not None:
            # The reclaimer thread did not survive; start a fresh one.
            self._reclaimer = ReclaimerThread(self._reclaim, self._options.reclaim_interval)


# The readers' calls and retire() as Domain's own C methods on the C kernel
# (see kernel.specialize).
specialize(Domain)
