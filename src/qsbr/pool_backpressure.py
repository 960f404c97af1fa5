"""Backpressure for BufferPool: what acquire() does when no block is free.

Released blocks wait for a grace period before reuse. When none of a class
is free and POLL_AFTER of its blocks wait, acquire() polls the domain once,
to the newest goal at the head of the waiting queues (a goal that is reached
frees every older block too), and tries again: reuse, a page that changes
class, or a new page. A poll that does not reach that goal (a reader is
still inside its read) moves the class's next poll POLL_AFTER blocks further
on: until then acquire() carves fresh blocks without polling, so a pending
grace period costs one poll per POLL_AFTER acquires, not one per acquire.
With ``max_bytes`` reached, ``on_full`` decides: "raise" gives
PoolExhaustedError at once; "block" waits, polling with a backoff up to
20 ms, until a block is free or ``timeout`` runs out (PoolExhaustedError
again). The error names the threads that hold reclamation back.

While it waits the caller counts as quiescent (it is detached for the
wait), as retire() does under a cap: a thread that waits for memory holds
nothing it read from shared structures, and its own retirements must not
hold back the grace period it waits for.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .domain import Domain
from .errors import PoolExhaustedError
from .pool_pages import Block, PageSet

#: With this many blocks of a class waiting (and none free), acquire() polls
#: the domain before carving fresh ones: reuse keeps the pool small and
#: cache-warm.
POLL_AFTER = 32

__all__ = ["Backpressure"]


class Backpressure:
    """BufferPool's slow acquire path (a mixin: BufferPool sets the state)."""

    _lock: threading.Lock
    _p: PageSet
    _domain: Domain
    _debug: bool
    _on_full: str
    _max_bytes: int | None
    _full_waits: int
    _exhausted: int
    _poll_at: dict[int, int]
    _classes: list[int]

    if TYPE_CHECKING:  # BufferPool's own, used here

        def _check_open(self) -> None: ...
        def _maybe_trim(self) -> None: ...
        def _hand_out(self, block: Block, nbytes: int) -> memoryview: ...
        def _sync(self, size: int | None = None) -> None: ...
        def _waiting(self, size: int) -> int: ...
        def _try_core(self, nbytes: int, size: int) -> memoryview | None: ...

    _core: Any

    def _acquire_slow(
        self,
        nbytes: int,
        attempt: Callable[[], Block | None],
        timeout: float | None,
        size: int | None = None,
    ) -> memoryview:
        """Released blocks (of any class: a page may change class) may be
        safe by now: poll once, then try again; without room, wait or raise.
        ``size``: the size class asked for (None for a large block)."""
        reached = self._poll_for_waiting()
        if size is not None and (view := self._try_core(nbytes, size)) is not None:
            return view
        with self._lock:
            self._check_open()
            if size is not None:
                self._poll_at[size] = POLL_AFTER + (0 if reached else self._waiting(size))
            self._maybe_trim()
            block = attempt()
            if block is not None:
                return self._hand_out(block, nbytes)
        return self._wait_for_room(nbytes, attempt, timeout, size)

    def _poll_for_waiting(self) -> bool:
        """Outside our lock (a poll runs releases, which may use this pool):
        one poll to the newest head goal covers every class's oldest block.
        It rarely needs to advance: the pool advances wr_seq itself once
        POLL_AFTER blocks in a row come back with one goal (B6, in
        BufferPool._give_back and _kernel.c), so the grace period of the
        blocks waiting is under way before the free ones run out. Returns
        whether that goal is reached (True when nothing waits)."""
        with self._lock:
            heads = self._p.heads()
            if self._core is not None:
                # A class's blocks may wait in two queues (a spill left some
                # in the PageSet): its oldest is the older of the two heads.
                for index, core_head in self._core.goals():
                    size = self._classes[index]
                    heads[size] = min(heads.get(size, core_head), core_head)
        if not heads:
            return True
        if self._debug:
            return self._domain.poll()  # runs the grace-period callbacks (buffer_pool.py's docstring)
        domain = self._domain
        head = max(heads.values())  # every class's oldest (newer blocks get B6's advances)
        if domain.goal_reached(head):
            return True
        domain.poll(head)
        return domain.goal_reached(head)

    def _wait_for_room(
        self, nbytes: int, attempt: Callable[[], Block | None], timeout: float | None, size: int | None
    ) -> memoryview:
        if self._on_full == "raise":
            raise self._exhausted_error(nbytes, 0.0)
        with self._lock:
            self._full_waits += 1
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        domain = self._domain
        # The caller counts as quiescent while it waits, as retire() does
        # under a cap: it may hold nothing it read from shared structures.
        with domain.detached() if domain.is_attached() else contextlib.nullcontext():
            delay = 1e-4
            while True:
                self._poll_for_waiting()
                if size is not None and (view := self._try_core(nbytes, size)) is not None:
                    return view
                with self._lock:
                    self._check_open()
                    block = attempt()
                    if block is not None:
                        return self._hand_out(block, nbytes)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise self._exhausted_error(nbytes, now - start)
                time.sleep(delay if deadline is None else min(delay, deadline - now))
                delay = min(delay * 2, 0.02)

    def _exhausted_error(self, nbytes: int, waited: float) -> PoolExhaustedError:
        with self._lock:
            self._exhausted += 1
            self._sync()
            out, waiting, _ = self._p.byte_counts()
            heads = list(self._p.heads().values())
        assert self._max_bytes is not None
        holders = self._domain.holding_back(min(heads)) if heads else []
        return PoolExhaustedError(
            nbytes=nbytes,
            max_bytes=self._max_bytes,
            bytes_out=out,
            bytes_waiting=waiting,
            holders=tuple(holders),
            waited=waited,
        )
