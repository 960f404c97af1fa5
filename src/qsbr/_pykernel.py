"""The pure-Python kernel: the reference twin of the C kernel (_kernel.c).

The kernel is what readers run on every request: the design's ``wr_seq``,
each thread's ``seq``, ``quiescent()``, attach/detach and the read
sections, and the loads of one step of the rd_seq scan. kernel.py picks the
C twin when it was built (``qsbr.implementation == "native"``) and this one
otherwise, or when ``QSBR_PURE_PYTHON=1``. The two behave the same, errors
included; the rest of the package does not know which one it runs on. This
one is the reference: the interleaving scheduler (tests/interleave.py) and
the spin model check the protocol as written here.

How this twin keeps the hot path to one load and one store: a thread's
``threading.local`` (the domain's ``_tls``) holds, under ``report_to``, the
object that ``quiescent()`` stores into: the thread's state while it is
attached, a private ``Sink`` while it is detached (so quiescent() on a
detached thread cannot re-attach it, at no branch's cost). The thread's
handle keeps its own ``report_to``, which is ``UNREGISTERED`` once the
thread has left (its ``quiescent()`` then raises).

Invariant (kept by ThreadCore.attach/detach/_mark_unregistered and the
sections, all run by the owning thread):
    tls.report_to is state  <=>  state.seq != 0  (the thread is attached)
and handle.report_to is tls.report_to while the thread is registered,
UNREGISTERED after.

Memory ordering: every load and store here is one attribute access, which
CPython performs atomically on both builds, in program order (docs/design.md,
"Memory ordering", says why that is enough, and what the C twin does instead).
"""

from __future__ import annotations

import threading
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import unregistered_handle_error

if TYPE_CHECKING:
    from .domain import Domain

__all__ = [
    "DomainCore",
    "ThreadCore",
    "ThreadHandle",
    "ReadSection",
    "DetachedSection",
    "scan_slots",
    "specialize",
    "MAX_DEPTH",
    "Sink",
    "UNREGISTERED",
    "GraceTiming",
    "run_entries",
]

#: How deep sections of one kind nest (the C twin keeps the levels in 64 bits).
MAX_DEPTH = 62
_TOO_DEEP = 1 << MAX_DEPTH


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
        raise unregistered_handle_error()


UNREGISTERED = _Unregistered()


#: BufferPool's C fast path has no twin here: on this kernel the pool runs
#: its own Python code, the reference (buffer_pool.py, "The C fast path").
PoolCore: Any = None


class GraceTiming:
    """The times of the advances rd_seq has not reached yet (timing.py)."""

    #: Advances remembered; past this many outstanding (rd_seq far behind),
    #: later ones are not timed. Bounds the memory a stalled thread can make
    #: this part use.
    KEPT = 4096

    __slots__ = ("_lock", "_seqs", "_times", "longest", "rd_seq")

    # Invariant: _seqs is sorted (advances are recorded under the domain's
    # lock, in advance order: DomainCore.advance) and holds only values
    # rd_seq had not reached when covered() last ran.

    def __init__(self) -> None:
        self._lock: Any = threading.Lock()
        self._seqs = array("q")  # wr_seq values, ascending
        self._times = array("d")  # time.monotonic() of each advance
        #: Seconds: the longest grace period that has ended.
        self.longest = 0.0
        #: The largest rd_seq covered() was told of (B5 in _kernel.c: the C
        #: pool's fast path reads it there).
        self.rd_seq = 1

    def new_locks(self, factory: Callable[[], Any]) -> None:
        self._lock = factory()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def advanced(self, wr_seq: int) -> None:
        """wr_seq was just advanced to ``wr_seq`` (called in advance order)."""
        with self._lock:
            if len(self._seqs) < self.KEPT:
                self._seqs.append(wr_seq)
                self._times.append(time.monotonic())

    def covered(self, rd_seq: int) -> None:
        """rd_seq moved forward to ``rd_seq``: the grace periods of the
        advances up to it have ended."""
        with self._lock:
            if rd_seq > self.rd_seq:
                self.rd_seq = rd_seq
            seqs = self._seqs
            if seqs and seqs[0] <= rd_seq:
                took = time.monotonic() - self._times[0]  # the oldest took longest
                if took > self.longest:
                    self.longest = took
                k = bisect_right(seqs, rd_seq)
                del seqs[:k]
                del self._times[:k]

    def advanced_past(self, seq: int) -> float | None:
        """When wr_seq first advanced past ``seq`` (None: not since rd_seq
        passed it, or too long ago to be remembered)."""
        with self._lock:
            i = bisect_right(self._seqs, seq)
            return self._times[i] if i < len(self._times) else None

    def current(self, rd_seq: int) -> float:
        """Seconds since the oldest advance rd_seq has not reached (0 if none)."""
        with self._lock:
            seqs = self._seqs
            return time.monotonic() - self._times[0] if seqs and seqs[0] > rd_seq else 0.0

    @property
    def outstanding(self) -> int:
        """How many advances are remembered."""
        with self._lock:
            return len(self._seqs)


class DomainCore:
    """The kernel part of a Domain: wr_seq and the readers' calls."""

    __slots__ = ("_wr_seq", "_tls", "_skipped_polls", "_advances")

    _wr_seq: int
    _tls: threading.local
    #: The subclass's lock and timing records (Domain._lock, Domain._timing),
    #: which this twin's advance() and counter use.
    _lock: Any
    _timing: GraceTiming

    def __init__(self) -> None:
        self._wr_seq = 1
        #: Polls retire() skipped because they could find nothing (I7 in
        #: _kernel.c; Domain._after_advance).
        self._skipped_polls = 0
        #: advance() calls so far.
        self._advances = 0

    #: The calling thread's state for the call named ``what`` (registering
    #: it for "attached"), or NotRegisteredError: the subclass's method
    #: (Domain._thread_core), which both twins call on their slow path.
    _thread_core: Callable[[str], ThreadCore]

    def quiescent(self) -> None:
        """Report a quiescent state: the calling thread holds no reference
        to anything it read from shared structures. Takes no lock."""
        try:
            # One load of wr_seq, one store into this thread's own state (or
            # into its private sink while detached). Only this thread writes
            # that seq; scanners read it. The store is ordered after every
            # read of shared data this thread made before the call.
            self._tls.report_to.seq = self._wr_seq
        except AttributeError:
            self._thread_core("quiescent")  # raises NotRegisteredError

    def detach(self) -> None:
        """Leave rd_seq while blocking (I/O, sleep, waiting for work): the
        thread must hold no shared references until attach()."""
        try:
            state = self._tls.state
        except AttributeError:
            state = self._thread_core("detach")
        state.detach()

    def attach(self) -> None:
        """Rejoin after detach(): seq = wr_seq, before any shared read."""
        try:
            state = self._tls.state
        except AttributeError:
            state = self._thread_core("attach")
        state.attach(self._wr_seq)

    def attached(self) -> ReadSection:
        """``with domain.attached():`` a read section (see section.py)."""
        try:
            return self._tls.state.read_section  # type: ignore[no-any-return]
        except AttributeError:
            return self._thread_core("attached").read_section

    def detached(self) -> DetachedSection:
        """``with domain.detached(): blocking_call()``: detached for the block."""
        try:
            return self._tls.state.detached_section  # type: ignore[no-any-return]
        except AttributeError:
            return self._thread_core("detached").detached_section

    def _configure(
        self,
        fast: bool,
        deferred_limit: int,
        deferred_bytes: int,
        sizers: dict[Any, Any],
        timing: GraceTiming,
    ) -> None:
        """The C twin's retire() fast path and advance() records; nothing to
        set up here (Domain's retire() is the Python one: specialize(), and
        advance() below uses the domain's own _lock and _timing)."""

    def _count_skipped_poll(self) -> None:
        """Count a poll that retire() skipped (a statistic)."""
        with self._lock:
            self._skipped_polls += 1

    def advance(self) -> int:
        """wr_seq += 2; returns the new wr_seq."""
        with self._lock:
            # A read-modify-write (atomic in the C twin; this lock makes it so
            # here): concurrent advances add up. The store publishes the new
            # value to quiescent() readers, who load it without a lock. The
            # lock also keeps the timing records in advance order.
            self._wr_seq = new = self._wr_seq + 2
            self._advances += 1
            self._timing.advanced(new)
        return new


class ThreadCore:
    """The kernel part of a registered thread's state: its seq.

    A mixin: the subclass (ThreadState) provides ``tls``, ``handle`` and
    ``sink``, which this twin keeps ``report_to`` in step with."""

    __slots__ = (
        "seq",
        "read_section",
        "detached_section",
        "deferrals",
        "bytes_at_advance",
        "retired_bytes",
        "listed",
        "deferred",
        "pinned_seq",
        "poll_due",
    )

    seq: int
    read_section: ReadSection
    detached_section: DetachedSection
    deferrals: int
    bytes_at_advance: int
    retired_bytes: int
    listed: bool
    deferred: list[Any]
    pinned_seq: int
    poll_due: int
    tls: threading.local
    handle: ThreadHandle
    sink: Sink

    @property
    def registered(self) -> bool:
        """Whether the thread is still registered."""
        return self.handle.report_to is not UNREGISTERED

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

    def _mark_unregistered(self) -> None:
        """The thread left: seq = 0, and its handle's calls raise."""
        self.seq = 0
        self.handle.report_to = UNREGISTERED


class ThreadHandle:
    """The calling thread's own handle on a domain, for hot read loops (see
    thread_state.py and docs/api.md). It belongs to the thread that
    registered: never pass it to another thread."""

    __slots__ = ("report_to", "_domain", "_state", "__weakref__")

    def __init__(self, domain: Domain, state: ThreadCore) -> None:
        self.report_to: ThreadCore | Sink | _Unregistered = state
        self._domain = domain
        self._state = state

    @property
    def domain(self) -> Domain:
        """The domain this handle reports to."""
        return self._domain

    def _unregistered(self) -> None:
        raise unregistered_handle_error()

    def __repr__(self) -> str:
        if self.report_to is UNREGISTERED:
            return "<qsbr.ThreadHandle unregistered>"
        return f"<qsbr.ThreadHandle seq={self._state.seq}>"

    def quiescent(self) -> None:
        """Report a quiescent state for this thread. Takes no lock."""
        # The same single store as Domain.quiescent(), ordered the same way.
        self.report_to.seq = self._domain._wr_seq

    def _registered_state(self) -> ThreadCore:
        if self.report_to is UNREGISTERED:
            self._unregistered()
        return self._state

    def attached(self) -> ReadSection:
        """``with handle.attached():`` a read section."""
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


ThreadHandle.__module__ = "qsbr"


def _too_deep() -> RuntimeError:
    return RuntimeError(f"sections nest at most {MAX_DEPTH} deep: leave a block before entering another")


def _unmatched_exit() -> RuntimeError:
    return RuntimeError("__exit__ without a matching __enter__")


class ReadSection:
    """One thread's ``with domain.attached():`` (see section.py)."""

    __slots__ = ("_state", "_domain", "_tls", "_levels")

    def __init__(self, state: ThreadCore, domain: DomainCore) -> None:
        self._state = state
        self._domain = domain
        self._tls = state.tls
        self._levels = 1  # no level open

    @property
    def depth(self) -> int:
        """How many blocks of this thread are open."""
        return self._levels.bit_length() - 1

    # __enter__/__exit__ make the stores of ThreadCore.attach()/detach()
    # themselves, in the same order: a context manager must cost no more
    # than the calls it wraps (a call is most of the cost in pure Python).

    def __enter__(self) -> ReadSection:
        st = self._state
        levels = self._levels
        if levels >= _TOO_DEEP:
            raise _too_deep()
        if st.seq:
            self._levels = levels << 1 | 1
        else:
            self._levels = levels << 1
            st.seq = self._domain._wr_seq  # attach: before the block reads anything shared
            self._tls.report_to = st
            st.handle.report_to = st
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        levels = self._levels
        if levels <= 1:
            raise _unmatched_exit()
        self._levels = levels >> 1
        st = self._state
        if not levels & 1:  # this level found the thread detached: so it leaves it
            if st.seq:
                st.seq = 0  # detach: after the block's last shared read
                sink = st.sink
                self._tls.report_to = sink
                st.handle.report_to = sink
        elif levels == 3:  # the outermost block, entered attached: a quiescent state
            if st.seq:
                st.seq = self._domain._wr_seq
            else:  # detached inside the block: attached again, as it was
                st.attach(self._domain._wr_seq)


class DetachedSection:
    """One thread's ``with domain.detached():``: detached for the block, then
    attached again if it was attached when the block began."""

    __slots__ = ("_state", "_domain", "_tls", "_levels")

    def __init__(self, state: ThreadCore, domain: DomainCore) -> None:
        self._state = state
        self._domain = domain
        self._tls = state.tls
        self._levels = 1

    @property
    def depth(self) -> int:
        """How many blocks of this thread are open."""
        return self._levels.bit_length() - 1

    def __enter__(self) -> DetachedSection:
        st = self._state
        levels = self._levels
        if levels >= _TOO_DEEP:
            raise _too_deep()
        if st.seq:
            self._levels = levels << 1 | 1
            st.seq = 0  # detach (as ThreadCore.detach, inlined: see ReadSection)
            sink = st.sink
            self._tls.report_to = sink
            st.handle.report_to = sink
        else:
            self._levels = levels << 1
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        levels = self._levels
        if levels <= 1:
            raise _unmatched_exit()
        self._levels = levels >> 1
        if levels & 1:
            st = self._state
            st.seq = self._domain._wr_seq  # attach again, before any shared read
            self._tls.report_to = st
            st.handle.report_to = st


def specialize(cls: type) -> None:
    """Nothing to do for the pure twin: ``cls.retire`` stays the Python one
    (the C twin gives the subclass its own C method descriptors for the
    readers' calls and retire(), for CPython's specialized calls)."""


def scan_slots(slots: list[Any], start: int, end: int, lowest: int) -> tuple[int, Any, int]:
    """One step of an rd_seq pass over ``slots[start:end]``: (the minimum of
    ``lowest`` and every attached state's seq, the state that holds it or
    None if ``lowest`` stood, how many attached states the step saw).
    None slots and detached states (seq 0) are left out."""
    lowest_state = None
    attached = 0
    # One C-level copy of the step's slots, then a loop over a list this
    # thread owns: on free-threaded 3.13, indexing the shared list item by
    # item costs an atomic reference per item.
    for st in slots[start:end]:
        if st is not None:
            seq = st.seq
            if seq:
                attached += 1
                if seq < lowest:
                    lowest = seq
                    lowest_state = st
    return lowest, lowest_state, attached


def run_entries(
    chunk: list[Any], on_error: Callable[[BaseException, Any], object]
) -> tuple[int, int, int, BaseException | None]:
    """Run release(arg) for each entry [goal, release, arg, size] of
    ``chunk``, in order: (ran, freed, errors, stopped). A release that raises
    an Exception goes to ``on_error(exc, arg)`` and the rest still run. A
    BaseException (or an exception from on_error) stops the loop and is
    returned as ``stopped``, not raised: the entries after the first ``ran``
    did not run. ``ran`` and ``freed`` count the entry that raised."""
    ran = freed = errors = 0
    it = iter(chunk)
    try:
        for _goal, fn, arg, size in zip(it, it, it, it):  # noqa: B905 - whole entries by design
            ran += 1
            freed += size
            try:
                fn(arg)
            except Exception as exc:
                errors += 1
                on_error(exc, arg)
    except BaseException as exc:
        return ran, freed, errors, exc
    return ran, freed, errors, None
