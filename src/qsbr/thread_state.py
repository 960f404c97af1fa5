"""Per-thread state: the design's "per-thread read sequence".

Each registered thread owns one ``ThreadState``. Its ``seq`` is the value of
``wr_seq`` the thread copied at its last quiescent state, or 0 while the
thread is detached (detached threads hold no shared references and are left
out of ``rd_seq``). Only the owning thread ever writes its ``seq``; scanners
in other threads only read it. That single-writer rule is what lets
``quiescent()`` be one plain store with no lock.

``seq`` and the operations on it (attach, detach, the thread leaving) are the
kernel's (kernel.py: ThreadCore, in C or in pure Python); ThreadState adds
what the policy parts keep per thread (deferral counts, the backlog, stall
marks, identity). ThreadHandle is the kernel's own type; this module adds
debug mode's CheckedThreadHandle and the exit sentinel.

A thread finds its state through the domain's ``threading.local``
(``tls.state``). A thread that exits while registered must not hold
reclamation back forever (CPython's gh-130794). The local also holds an
``ExitSentinel``; when the thread ends, CPython clears the thread's locals
(in the exiting thread), the sentinel is destroyed, and its ``__del__``
calls back into the domain, which unregisters the state. This works on 3.11
and on free-threaded 3.13t (tests/test_threads.py checks it on both).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .kernel import DetachedSection, ReadSection, Sink, ThreadCore, ThreadHandle

if TYPE_CHECKING:
    from .domain import Domain

__all__ = ["ThreadState", "ExitSentinel", "ThreadHandle", "CheckedThreadHandle"]


# ThreadHandle is the kernel's own type (``qsbr.ThreadHandle``): the
# calling thread's handle on a domain, for hot read loops.
# ``handle.quiescent()`` is ``domain.quiescent()`` without finding the thread's
# state through the domain: one load of wr_seq, one store into this thread's
# state. ``attach()``, ``detach()``, ``attached()`` and ``detached()`` are
# the domain's, for this thread, without the lookup. A handle belongs to the
# thread that registered: never pass it to another thread (its store would be
# that thread's quiescent state, a lie; in debug mode that raises
# RuntimeError). On a detached thread ``quiescent()`` does nothing; once the
# thread has left the domain every call raises NotRegisteredError. It is not
# subclassed on the hot path: CPython specializes a call of a C method only
# for instances of the method's own type (about 20 ns a call on 3.11).


class CheckedThreadHandle(ThreadHandle):
    """A debug-mode domain's handle: every use checks the calling thread."""

    __slots__ = ("_ident",)

    _state: ThreadState

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


class ThreadState(ThreadCore):
    """One registered thread's view of the domain."""

    # seq, read_section and detached_section, and the writer's deferrals,
    # bytes_at_advance, retired_bytes, listed and deferred, are the
    # kernel's ThreadCore (retire()'s fast path reads them in C).
    __slots__ = (
        "handle",
        "tls",
        "stall_seq",
        "stall_reports",
        "slot",
        "ident",
        "name",
        "pid",
        "sink",
        "__weakref__",
    )

    handle: ThreadHandle

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
        #: Whether retire() may skip its next poll (Domain._after_advance):
        #: the seq with which this thread's last poll from retire() found
        #: rd_seq held where its own seq holds it (0: it did not), and
        #: time.monotonic_ns() past which it polls regardless.
        self.pinned_seq = 0
        self.poll_due = 0
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
