"""Debug mode for BufferPool: blocks that are never given back.

``with pool.acquire(n) as v:`` is accepted by Python (memoryview is a
context manager) and releases only the memoryview: the block stays "out"
for ever. So does a view dropped without ``pool.release()``. A debug-mode
pool keeps its views weakly (``hold``) and reports a block once every view
of it is released or gone without being given back: when a view is
garbage-collected (or, if the pool's lock is held at that moment, at the
next acquire: the callback never waits, see ``BufferPool._report_lost``),
every LEAK_CHECK_EVERY-th acquire(), and at close().
(The poison written when a grace period ends, and its check when a block is
handed out again, are in buffer_pool.py.)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from .pool_pages import Block
from .stall import logger

__all__ = ["hold", "report_leaks", "is_released"]


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


def report_leaks(out: Iterable[tuple[Any, Block | None, int]], at_close: bool) -> None:
    """Report, once each, the blocks all of whose views in ``out`` (the
    pool's table of views, holding weak references) are released or gone."""
    by_block: dict[int, list[Any]] = {}
    for held, block, _ in out:
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
