"""Read sections: ``with domain.attached():``, the rcu_read_lock() of qsbr.

A thread that serves one request at a time (a thread per connection, a
WSGI worker) should be attached only while it handles a request, and hold
nobody back while it waits for the next one. A read section says exactly
that:

    with domain.attached():
        table = current.value       # protected until the end of the block
        answer = table.lookup(key)
    # the end of the outermost block is a quiescent state

Entering attaches the calling thread (registering it first if it is not
registered; a thread that exits unregisters by itself). Leaving the
outermost block reports a quiescent state and restores what the thread was
before: detached (it then holds nobody back), or attached. Blocks nest:
only the outermost exit reports the quiescent state. ``with
domain.detached():`` is the converse, around a blocking call.

Each thread has one ``ReadSection`` and one ``DetachedSection`` object,
made once and reused, so a block costs two method calls and a few stores.
Each keeps, per nesting level, whether the thread was attached when the
level began, as bits of one int (``levels``: a 1 followed by one bit per
open level), so nesting allocates nothing.

Invariants (as for attach/detach, see thread_state.py):
* Entering from detached stores ``seq = wr_seq`` before the block reads
  anything shared; leaving to detached stores ``seq = 0`` after the block's
  last read (program order).
* ``report_to`` (thread-local and handle) follows ``seq``: the ThreadState
  while attached, the thread's Sink while detached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .domain import Domain
    from .thread_state import ThreadState

__all__ = ["ReadSection", "DetachedSection", "Registered"]


class ReadSection:
    """One thread's ``with domain.attached():`` (see the module docstring)."""

    __slots__ = ("_state", "_domain", "_tls", "_levels")

    def __init__(self, state: ThreadState, domain: Domain) -> None:
        self._state = state
        self._domain = domain
        self._tls = state.tls
        self._levels = 1  # no level open

    @property
    def depth(self) -> int:
        """How many blocks of this thread are open."""
        return self._levels.bit_length() - 1

    # __enter__/__exit__ make the stores of ThreadState.attach()/detach()
    # themselves, in the same order: a context manager must cost no more
    # than the calls it wraps (a call is most of the cost in pure Python).

    def __enter__(self) -> ReadSection:
        st = self._state
        if st.seq:
            self._levels = self._levels << 1 | 1
        else:
            self._levels <<= 1
            st.seq = self._domain._wr_seq  # attach: before the block reads anything shared
            self._tls.report_to = st
            st.handle.report_to = st
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        levels = self._levels
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

    def __init__(self, state: ThreadState, domain: Domain) -> None:
        self._state = state
        self._domain = domain
        self._tls = state.tls
        self._levels = 1

    def __enter__(self) -> DetachedSection:
        st = self._state
        if st.seq:
            self._levels = self._levels << 1 | 1
            st.seq = 0  # detach (as ThreadState.detach, inlined: see ReadSection)
            sink = st.sink
            self._tls.report_to = sink
            st.handle.report_to = sink
        else:
            self._levels <<= 1
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        levels = self._levels
        self._levels = levels >> 1
        if levels & 1:
            st = self._state
            st.seq = self._domain._wr_seq  # attach again, before any shared read
            self._tls.report_to = st
            st.handle.report_to = st


class Registered:
    """``with domain.registered():`` register on enter (returning the
    domain), unregister on exit. Holds only the domain: one per call."""

    __slots__ = ("_domain",)

    def __init__(self, domain: Domain) -> None:
        self._domain = domain

    def __enter__(self) -> Domain:
        self._domain.register()
        return self._domain

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._domain.unregister()
