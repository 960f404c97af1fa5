"""Deferred work: the design's "deferred-free list".

Each retire() appends one item, tagged with its goal, to a domain-wide FIFO
queue (a ``collections.deque``: append and popleft are atomic on both the
GIL and the free-threaded build, so retire() takes no lock). A poller takes
the ready prefix of the queue (every item whose goal <= rd_seq) as a *batch*
under the queue lock, and runs it *after* releasing that lock, so a release
may call retire() or poll() again and can never deadlock on us.

Item layout, a 4-tuple (kept small: it is built on every retire()):
    (goal, owner, fn, arg)   runs fn(arg), or fn() when arg is NO_ARG

Invariants:
* An item leaves the queue only under ``_lock`` and goes into exactly one
  batch; a batch is run by exactly one thread, so each release runs once.
* Goals in the queue are almost sorted: two threads may append out of goal
  order (goal read, then append, is not atomic). A poller stops at the first
  item that is not ready, so an out-of-order item can be released *later*
  than it could be, never earlier.
* ``_taken`` counts items ever taken into batches; together with the batches
  still running it tells barrier() when everything queued before it has run.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Optional, Tuple

from .thread_state import ThreadState

__all__ = ["NO_ARG", "Item", "DeferredQueue", "ErrorHandler"]


class _NoArg:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_ARG"


#: Marks an item created by defer(): its callable takes no argument.
NO_ARG: Any = _NoArg()

Item = Tuple[int, Optional[ThreadState], Callable[..., Any], Any]
ErrorHandler = Callable[[BaseException, Any], None]


class _Batch:
    """Items taken together, run by one thread."""

    __slots__ = ("start", "items")

    def __init__(self, start: int, items: deque[Item]) -> None:
        self.start = start  # value of DeferredQueue._taken before this batch
        self.items = items


class DeferredQueue:
    """Pending releases, oldest first."""

    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self._lock = threading.Lock()
        self._batch_done = threading.Condition(self._lock)
        self._running: dict[int, _Batch] = {}
        self._next_batch_id = 0
        self._taken = 0
        self.released = 0
        self.errors = 0
        self.max_pending = 0

    def reset_after_fork(self) -> None:
        """In a forked child: batches run by other threads died with them."""
        self._lock = threading.Lock()
        self._batch_done = threading.Condition(self._lock)
        self._running.clear()

    # -- producers -------------------------------------------------------

    def push(self, item: Item) -> None:
        self._items.append(item)

    # -- observers -------------------------------------------------------

    def __len__(self) -> int:
        """Scheduled releases not yet run (queued plus in running batches)."""
        with self._lock:
            n = len(self._items)
            for batch in self._running.values():
                n += len(batch.items)
            return n

    def last_goal(self) -> int:
        """The goal of the newest item, or 0 when the queue is empty."""
        try:
            return self._items[-1][0]
        except IndexError:
            return 0

    def first_goal(self) -> int:
        try:
            return self._items[0][0]
        except IndexError:
            return 0

    def ticket(self) -> int:
        """A position: every item queued before this call lies before it."""
        with self._lock:
            return self._taken + len(self._items)

    def done_before(self, ticket: int) -> bool:
        """Whether every item before ``ticket`` has been taken and run."""
        with self._lock:
            return self._done_before_locked(ticket)

    def _done_before_locked(self, ticket: int) -> bool:
        if self._taken < ticket:
            return False
        return all(b.start >= ticket for b in self._running.values())

    def wait_batches(self, ticket: int, timeout: float | None) -> bool:
        """Wait until batches holding items before ``ticket`` have finished."""
        with self._lock:
            return self._batch_done.wait_for(
                lambda: all(b.start >= ticket for b in self._running.values()), timeout
            )

    # -- consumers -------------------------------------------------------

    def take_ready(self, rd_seq: int, owner: ThreadState | None) -> tuple[int, _Batch] | None:
        """Take every item whose goal <= rd_seq (and, when ``owner`` is
        given, every item that ``owner`` retired) into a new batch.

        ``owner`` is the design's "not shared" fast path: the caller is the
        only attached thread, so no other thread can hold what the caller
        itself unlinked and retired.
        """
        with self._lock:
            items = self._items
            pending = len(items)
            if pending > self.max_pending:
                self.max_pending = pending
            batch: deque[Item] = deque()
            if owner is None:
                # Stop at the first item not ready: see "almost sorted" above.
                while items and items[0][0] <= rd_seq:
                    batch.append(items.popleft())
            else:
                keep: list[Item] = []
                # Appends from other threads land on the right meanwhile;
                # we take exactly the `pending` oldest items.
                for _ in range(pending):
                    item = items.popleft()
                    if item[0] <= rd_seq or item[1] is owner:
                        batch.append(item)
                    else:
                        keep.append(item)
                items.extendleft(reversed(keep))
            if not batch:
                return None
            bid = self._next_batch_id
            self._next_batch_id = bid + 1
            b = _Batch(self._taken, batch)
            self._taken += len(batch)
            self._running[bid] = b
            return bid, b

    def run(self, bid: int, batch: _Batch, on_error: ErrorHandler) -> int:
        """Run a taken batch, outside every lock; returns how many ran.

        A release that raises an Exception is reported through ``on_error``
        and the rest still run. A BaseException (KeyboardInterrupt,
        SystemExit) stops the batch: the items not yet run go back to the
        front of the queue, so nothing is lost, and the exception propagates.
        """
        items = batch.items
        ran = errors = 0
        try:
            while items:
                _goal, _owner, fn, arg = items.popleft()
                try:
                    if arg is NO_ARG:
                        fn()
                    else:
                        fn(arg)
                except Exception as exc:
                    errors += 1
                    on_error(exc, fn if arg is NO_ARG else arg)
                ran += 1
        finally:
            with self._lock:
                if items:  # interrupted by a BaseException
                    self._items.extendleft(reversed(items))
                    self._taken -= len(items)
                    items.clear()
                del self._running[bid]
                self.released += ran
                self.errors += errors
                self._batch_done.notify_all()
        return ran
