"""Per-thread state: the design's "per-thread read sequence".

Each registered thread owns one ``ThreadState``. Its ``seq`` is the value of
``wr_seq`` the thread copied at its last quiescent state, or 0 while the
thread is detached (detached threads hold no shared references and are left
out of ``rd_seq``). Only the owning thread ever writes its ``seq``; scanners
in other threads only read it. That single-writer rule is what lets
``quiescent()`` be one plain store with no lock.

A thread finds its state through the domain's ``threading.local``. The local
also holds, under ``report_to``, the object whose ``seq`` ``quiescent()``
stores into: the ``ThreadState`` itself while the thread is attached, or a
private ``Sink`` while it is detached. So a quiescent() call from a detached
thread cannot silently re-attach it, and it costs no branch on the hot path.

Invariant (kept by Domain.register/attach/detach/unregister):
    tls.report_to is tls.state  <=>  tls.state.seq != 0  (the thread is attached)
and the same for the thread's ThreadHandle: handle.report_to is
tls.report_to while the thread is registered, and UNREGISTERED after.

The hot path reads one field of the domain directly: ``ThreadHandle``'s
``quiescent()`` loads ``domain._wr_seq``, the slot ``Domain.quiescent()``
loads too. A property would double the cost of the call this class exists
to make cheap; it is the only private member of the domain read here.

A thread that exits while registered must not hold reclamation back forever
(CPython's gh-130794). The local also holds an ``ExitSentinel``; when the
thread ends, CPython clears the thread's locals, the sentinel is destroyed,
and its ``__del__`` calls back into the domain, which unregisters the state.
This works on 3.11 and on free-threaded 3.13t (tests/test_threads.py checks
it on both).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import NotRegisteredError
from .section import DetachedSection, ReadSection

if TYPE_CHECKING:
    from .domain import Domain

__all__ = ["ThreadState", "Sink", "ExitSentinel", "ThreadHandle", "CheckedThreadHandle", "UNREGISTERED"]


class Sink:
    """Where a detached thread's quiescent() stores land; nobody reads it."""

    __slots__ = ("seq",)

    def __init__(self) -> None:
        self.seq = 0


class _Unregistered:
    """Where a handle points once its thread has left the domain."""

    __slots__ = ()

    @property
    def seq(self) -> int:
        return 0

    @seq.setter
    def seq(self, value: int) -> None:
        raise NotRegisteredError(
            "this ThreadHandle's thread is no longer registered: register() again and use the "
            "handle it returns (or domain.quiescent())"
        )


UNREGISTERED = _Unregistered()


class ThreadHandle:
    """The calling thread's own handle on a domain, for hot read loops.

    ``handle.quiescent()`` is ``domain.quiescent()`` without finding the
    thread's state through the domain's threading.local: one load of
    wr_seq, one store into this thread's state. docs/benchmarks.md has the
    figures; on free-threaded Python it also reads one shared object fewer
    (reads of shared objects are what contend there). ``attach()``,
    ``detach()``, ``attached()`` and ``detached()`` are the domain's, for
    this thread, without the thread-local lookup.

    A handle belongs to the thread that registered: never pass it to
    another thread (its store would be that thread's quiescent state, a
    lie; in debug mode that raises RuntimeError). Like tls.report_to,
    ``report_to`` is the ThreadState while the thread is attached and its
    private Sink while it is detached (so quiescent() on a detached thread
    does nothing), and UNREGISTERED once it has left (quiescent() then
    raises NotRegisteredError).
    """

    __slots__ = ("report_to", "_domain", "_state", "__weakref__")

    def __init__(self, domain: Domain, state: ThreadState) -> None:
        self.report_to: ThreadState | Sink | _Unregistered = state
        self._domain = domain
        self._state = state

    @property
    def domain(self) -> Domain:
        return self._domain

    def quiescent(self) -> None:
        """Report a quiescent state for this thread. Takes no lock."""
        # The same single store as Domain.quiescent(), ordered the same way.
        self.report_to.seq = self._domain._wr_seq

    def _registered_state(self) -> ThreadState:
        if self.report_to is UNREGISTERED:
            UNREGISTERED.seq = 0  # raises NotRegisteredError, with the hint
        return self._state

    def attached(self) -> ReadSection:
        """``with handle.attached():`` a read section (see section.py)."""
        return self._registered_state().read_section

    def detached(self) -> DetachedSection:
        """``with handle.detached():`` around a blocking call."""
        return self._registered_state().detached_section

    def attach(self) -> None:
        """Rejoin after detach(): seq = wr_seq, before any shared read."""
        self._registered_state().attach(self._domain._wr_seq)

    def detach(self) -> None:
        """Leave rd_seq while blocking; hold no shared reference until attach()."""
        self._registered_state().detach()

    def __repr__(self) -> str:
        return f"<qsbr.ThreadHandle report_to={self.report_to!r}>"


class CheckedThreadHandle(ThreadHandle):
    """A debug-mode domain's handle: every use checks the calling thread."""

    __slots__ = ("_ident",)

    def __init__(self, domain: Domain, state: ThreadState) -> None:
        super().__init__(domain, state)
        self._ident = state.ident

    def _check_thread(self) -> None:
        if threading.get_ident() != self._ident:
            raise RuntimeError(
                f"this ThreadHandle belongs to thread {self._state.name!r} (ident {self._ident}); "
                f"it was used from {threading.current_thread().name!r}. A handle reports its own "
                "thread's quiescent states: call domain.register() in each thread and use the "
                "handle it returns there (or domain.quiescent())"
            )

    def quiescent(self) -> None:
        self._check_thread()
        super().quiescent()

    def attached(self) -> ReadSection:
        self._check_thread()
        return super().attached()

    def detached(self) -> DetachedSection:
        self._check_thread()
        return super().detached()

    def attach(self) -> None:
        self._check_thread()
        super().attach()

    def detach(self) -> None:
        self._check_thread()
        super().detach()


class ThreadState:
    """One registered thread's view of the domain."""

    __slots__ = (
        "seq",
        "handle",
        "tls",
        "read_section",
        "detached_section",
        "deferrals",
        "bytes_at_advance",
        "retired_bytes",
        "stall_seq",
        "stall_reports",
        "deferred",
        "listed",
        "slot",
        "ident",
        "name",
        "pid",
        "sink",
        "__weakref__",
    )

    def __init__(
        self, domain: Domain, tls: threading.local, seq: int, handle_class: type[ThreadHandle] = ThreadHandle
    ) -> None:
        """The calling thread's state in ``domain``, attached with ``seq``
        (``tls`` is the domain's thread-local)."""
        #: wr_seq as of this thread's last quiescent state; 0 = detached.
        self.seq = seq
        #: Retirements since this thread last advanced wr_seq (the design's
        #: deferral count; see Domain._take_goal).
        self.deferrals = 0
        #: Bytes this thread ever retired (for pending_bytes), and that total
        #: as of its last advance of wr_seq (the byte trigger fires when the
        #: difference passes Domain.deferred_bytes). Written only by this
        #: thread while registered.
        self.retired_bytes = 0
        self.bytes_at_advance = 0
        #: The seq at which this thread's current stall was first reported
        #: (quiescing ends a stall), and how many reports it has had since
        #: (repeats back off: see stall.py). Written by stall checkers.
        self.stall_seq = 0
        self.stall_reports = 0
        #: This thread's deferred-free list, flat: [goal, fn, arg, size, ...]
        #: (see deferred.py). Appended only by this thread.
        self.deferred: list[Any] = []
        #: Whether DeferredWork lists this thread as one that retires; set on
        #: its first retire(), so that polls visit writers only, not readers.
        self.listed = False
        #: Index in the registry's slot list; -1 while not registered.
        self.slot = -1
        self.ident = threading.get_ident()
        self.name = threading.current_thread().name
        #: The process that registered the thread: after os.fork() the states
        #: of threads that did not survive are recognised by a stale pid.
        self.pid = os.getpid()
        self.sink = Sink()
        self.tls = tls
        #: The thread's handle (register() returns it) and its two reusable
        #: context managers (section.py).
        self.handle = handle_class(domain, self)
        self.read_section = ReadSection(self, domain)
        self.detached_section = DetachedSection(self, domain)

    def attach(self, wr_seq: int) -> None:
        """Attached again: ``seq = wr_seq``, stored before the thread reads
        anything shared (program order). Only the owning thread calls it."""
        self.seq = wr_seq
        self.tls.report_to = self
        self.handle.report_to = self

    def detach(self) -> None:
        """Detached: ``seq = 0``, stored after every shared read the thread
        made (program order), so a scanner that sees 0 may leave it out."""
        self.seq = 0
        sink = self.sink
        self.tls.report_to = sink
        self.handle.report_to = sink

    def __repr__(self) -> str:
        return f"<ThreadState {self.name!r} ident={self.ident} seq={self.seq}>"


class Deferrals:
    """The deferral count of a thread that calls deferred_advance() without
    being registered (kept in the domain's threading.local). It has the
    fields of ThreadState that Domain._take_goal uses; such a thread retires
    nothing, so its byte counts stay 0."""

    __slots__ = ("deferrals", "retired_bytes", "bytes_at_advance")

    def __init__(self) -> None:
        self.deferrals = 0
        self.retired_bytes = 0
        self.bytes_at_advance = 0


class ExitSentinel:
    """Lives only in a thread's locals; unregisters the thread when it dies.

    ``on_exit`` is a weak method (the domain's ``_thread_exited``): the
    sentinel must not keep the domain alive, and a domain that is gone has
    nothing to unregister."""

    __slots__ = ("on_exit", "state", "armed")

    def __init__(self, on_exit: Callable[[ThreadState], None], state: ThreadState) -> None:
        self.on_exit: weakref.WeakMethod[Callable[[ThreadState], None]] = weakref.WeakMethod(on_exit)
        self.state = state
        # Disarmed by an explicit unregister(), so a thread is never
        # unregistered twice.
        self.armed = True

    def __del__(self) -> None:
        if not self.armed:
            return
        self.armed = False
        on_exit = self.on_exit()
        if on_exit is not None:
            on_exit(self.state)
