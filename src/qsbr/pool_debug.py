"""Debug mode for BufferPool: blocks that are never given back.

``with pool.acquire(n) as v:`` is accepted by Python (memoryview is a
context manager) and releases only the memoryview: the block stays "out"
for ever. So does a view dropped without ``pool.release()``. A debug-mode
pool keeps its views weakly (``hold``) and reports a block once every view
of it is released or gone without being given back: when a view is
garbage-collected (or, if the pool's lock is held at that moment, at the
next acquire: the callback never waits, see ``BufferPool._report_lost``),
every LEAK_CHECK_EVERY-th acquire(), and at close().
Poison: a released block is also retired to the domain; when its grace
period ends (at whichever poll finds it safe) ``_grace_ended`` fills it with
POISON, and the next hand-out checks the poison (``_check_poison``) and
raises UseAfterReleaseError if a stale view wrote to it meanwhile.
``DebugPool`` holds these methods of BufferPool (a mixin).
"""

from __future__ import annotations

import collections
import itertools
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from .errors import UseAfterReleaseError
from .pool_pages import OUT_SHARD_MASK, Block, PageSet, byte_view, poison
from .stall import logger

__all__ = ["DebugPool", "hold", "report_leaks", "is_released"]


def hold(view: memoryview, on_drop: Callable[[int], None]) -> weakref.ReferenceType[memoryview]:
    """A weak reference to ``view`` that calls ``on_drop(id(view))`` when the
    view is garbage-collected (``on_drop`` must not keep the pool alive)."""
    ident = id(view)
    return weakref.ref(view, lambda _: on_drop(ident))


def is_released(view: memoryview) -> bool:
    try:
        view.nbytes  # noqa: B018 - raises on a released view
    except ValueError:
        return True
    return False


def report_leaks(out: Iterable[tuple[Any, Block | None, int, Any]], at_close: bool) -> None:
    """Report, once each, the blocks all of whose views in ``out`` (the
    pool's table of views, holding weak references) are released or gone."""
    by_block: dict[int, list[Any]] = {}
    for held, block, *_ in out:
        if block is not None and not block.reported:
            by_block.setdefault(id(block), [block]).append(held())
    for block, *views in by_block.values():
        if all(v is None or is_released(v) for v in views):
            block.reported = True
            logger.warning(
                "qsbr: a %s-byte BufferPool block was never given back%s: every view of it was "
                "released or dropped, but not with pool.release(). `with pool.acquire(n) as v:` "
                "only releases the memoryview: use `with pool.buffer(n) as v:`.",
                f"{block.size:,}",
                " at close()" if at_close else "",
            )


class DebugPool:
    """BufferPool's debug-mode methods (a mixin: BufferPool sets the state)."""

    _lock: threading.Lock
    _p: PageSet
    _closed: bool
    _out: list[dict[int, tuple[Any, Block | None, int, list[object] | None]]]
    _dropped: collections.deque[int]

    def _check_poison(self, block: Block) -> None:
        """(Under the lock.) A poisoned block about to be handed out again
        must still hold its poison."""
        block.poisoned = False
        stale = byte_view(block.page.mem, block.offset, block.offset + block.size)
        if stale != poison(block.size):
            stale[:] = poison(block.size)
            block.poisoned = True
            self._p.give_back(block)
            raise UseAfterReleaseError(
                f"a released block of {block.size:,} bytes was written after its grace period "
                "ended: a view of it was kept (and written) past its release. Find the code "
                "that writes through a view after pool.release() (or after the thread's "
                "quiescent state)."
            )

    def _put_out_debug(
        self, view: memoryview, block: Block | None, start: int, tokens: list[object] | None
    ) -> None:
        """(Under the lock.) Debug mode keeps a view weakly, to report its
        block if the view is dropped unreleased (pool_debug.py). Such a view
        may have left its id to this one: look for lost blocks before its
        entry is overwritten, or that block would never be reported."""
        if id(view) in self._out[id(view) >> 4 & OUT_SHARD_MASK]:
            self._dropped.clear()
            self._check_leaks()
        elif self._dropped:
            self._check_dropped()
        pool_ref = weakref.ref(self)

        def dropped(ident: int) -> None:
            pool = pool_ref()
            if pool is not None:
                pool._report_lost(ident)

        self._out[id(view) >> 4 & OUT_SHARD_MASK][id(view)] = (hold(view, dropped), block, start, tokens)

    def _grace_ended(self, block: Block) -> None:
        """Debug mode: the domain's release of a block, run when no thread
        can hold a view of it. Poison it, then let it be reused."""
        with self._lock:
            if self._closed:
                return
            if not block.page.large:
                byte_view(block.page.mem, block.offset, block.offset + block.size)[:] = poison(block.size)
                block.poisoned = True
            block.safe = True

    def _check_leaks(self, at_close: bool = False) -> None:
        """(Under the lock.) pool_debug.py: blocks never given back."""
        report_leaks(itertools.chain.from_iterable(shard.values() for shard in self._out), at_close)

    def _report_lost(self, ident: int) -> None:
        """Debug mode: a view out of this pool was garbage-collected.

        This runs in a weak-reference callback: in whatever thread dropped
        the view or ran the collection, at any point of its code, perhaps
        inside one of our own locked sections (a collection can start at
        any allocation). Waiting for ``_lock`` there would deadlock that
        thread with itself. So it never waits: the drop is noted (a deque
        append needs no lock), and checked now if the lock is free, else by
        whoever holds it, at their next ``_check_dropped()``."""
        self._dropped.append(ident)
        if self._lock.acquire(blocking=False):
            try:
                self._check_dropped()
            finally:
                self._lock.release()

    def _check_dropped(self) -> None:
        """(Under the lock.) Look for lost blocks if a view that was still
        out has been garbage-collected since the last look."""
        lost = False
        while self._dropped:
            try:
                ident = self._dropped.popleft()
            except IndexError:  # taken by a racing callback's check
                break
            lost = lost or ident in self._out[ident >> 4 & OUT_SHARD_MASK]
        if lost and not self._closed:
            self._check_leaks()
