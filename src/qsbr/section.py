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
open level), so nesting allocates nothing; sections of one kind nest at most
``MAX_DEPTH`` (62) deep, and an ``__exit__`` without its ``__enter__``
raises RuntimeError. Both classes are the kernel's (kernel.py: in C, or in
_pykernel.py), since they are on every request's path.

Invariants (as for attach/detach, see thread_state.py and _kernel.c):
* Entering from detached stores ``seq = wr_seq`` before the block reads
  anything shared (the C twin follows the store with a seq_cst fence);
  leaving to detached stores ``seq = 0`` after the block's last read.
* The outermost exit of a read section entered attached is a quiescent
  state: ``seq = wr_seq``, stored after the block's last shared read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .kernel import MAX_DEPTH, DetachedSection, ReadSection

if TYPE_CHECKING:
    from .domain import Domain

__all__ = ["ReadSection", "DetachedSection", "Registered", "MAX_DEPTH"]


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
