"""A BufferPool's pages and blocks: the design's mimalloc page rule.

* A page is carved, lazily, into blocks of one size class.
* A released block waits, tagged with a goal, and becomes free once the
  goal is reached (in debug mode: once the domain has run its grace-period
  callback, which poisons it).
* A page whose blocks are all back may serve another size class, or be given
  back (trimmed), only after the goal of the last block released from it
  has been reached.
* A request above the largest class gets a block of its own, freed (not
  reused) after its grace period.

Everything here runs under the owning pool's lock (buffer_pool.py); the
invariants are listed there. This module also makes the memory and the
views: pages are ctypes byte arrays (a bytearray's export count races on
free-threaded 3.13; buffer_pool.py, "Memory and views").
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .domain import Domain

try:
    import ctypes
except ImportError:  # pragma: no cover - a CPython without ctypes
    ctypes = None  # type: ignore[assignment]

__all__ = [
    "PageSet",
    "Page",
    "Block",
    "new_memory",
    "address_of",
    "HAS_ADDRESSES",
    "byte_view",
    "poison",
    "POISON",
]

POISON = 0xDB  # what debug mode writes over a block once it is safe
_POISONS: dict[int, bytes] = {}


def new_memory(nbytes: int) -> Any:
    """Zeroed memory that exports buffers without a shared count: a ctypes
    byte array (a bytearray where there is no ctypes)."""
    return (ctypes.c_ubyte * nbytes)() if ctypes is not None else bytearray(nbytes)


#: Whether pages are ctypes arrays, whose addresses the C fast path uses.
HAS_ADDRESSES = ctypes is not None


def address_of(mem: Any) -> int | None:
    """The address of ``mem``'s first byte, for the C fast path (None for a
    bytearray: its memory may move, and the fast path is then off)."""
    return ctypes.addressof(mem) if ctypes is not None and not isinstance(mem, bytearray) else None


def byte_view(mem: Any, start: int, stop: int) -> memoryview:
    """A fresh, writable, format "B" view of ``mem[start:stop]``."""
    return memoryview(mem).cast("B")[start:stop]


def poison(size: int) -> bytes:
    """``size`` bytes of POISON (cached per size)."""
    p = _POISONS.get(size)
    if p is None:
        p = _POISONS[size] = bytes([POISON]) * size
    return p


class Page:
    __slots__ = (
        "mem",
        "addr",
        "size",
        "block_size",
        "nblocks",
        "carved",
        "out",
        "last_goal",
        "free_since",
        "large",
    )

    def __init__(self, size: int, large: bool = False) -> None:
        self.mem = new_memory(size)  # never resized: views of it stay valid
        self.addr = address_of(self.mem)  # its first byte, while mem lives
        self.size = size
        self.block_size = 0
        self.nblocks = 0
        self.carved = 0  # blocks made so far (pages are carved lazily)
        self.out = 0  # its blocks out or waiting
        self.last_goal = 0
        self.free_since: float | None = None
        self.large = large


#: BufferPool's table of views out is OUT_SHARD_MASK + 1 dicts; a view's is
#: ``_out[id(view) >> 4 & OUT_SHARD_MASK]`` (ids of objects are multiples of 16).
OUT_SHARD_MASK = 63


class Block:
    __slots__ = ("page", "offset", "size", "goal", "safe", "poisoned", "reported", "__weakref__")

    def __init__(self, page: Page, offset: int, size: int) -> None:
        self.page = page
        self.offset = offset
        self.size = size
        self.goal = 0
        self.safe = False  # debug mode: the domain ran its grace-period callback
        self.poisoned = False  # debug mode: filled with POISON when it became safe
        self.reported = False  # debug mode: its leak was reported


class PageSet:
    """The pages, size classes and blocks of one pool (under its lock)."""

    def __init__(
        self, classes: list[int], page_size: int, max_bytes: int | None, domain: Domain, debug: bool
    ) -> None:
        self.classes = classes
        self.page_size = page_size
        self.max_bytes = max_bytes
        self._domain = domain
        self._debug = debug
        self.pages: list[Page] = []
        self.free: dict[int, list[Block]] = {c: [] for c in classes}
        self.waiting: dict[int, deque[Block]] = {c: deque() for c in classes}
        self._room: dict[int, list[Page]] = {c: [] for c in classes}  # pages with uncarved blocks
        self.in_use: dict[int, int] = dict.fromkeys(classes, 0)
        self.large_waiting: deque[Block] = deque()
        self.large_out = 0
        #: Memory held: pages, and large blocks out or waiting (<= max_bytes).
        self.bytes = 0
        self.trimmed = 0

    # -- taking a block ----------------------------------------------------

    def take(self, size: int, carve: bool) -> Block | None:
        """A free block of class ``size`` (carved fresh if ``carve``), or None."""
        free = self.free[size]
        if not free:
            self.collect(size)
        block = free.pop() if free else self._carve(size) if carve else None
        if block is None:
            return None
        page = block.page
        page.out += 1
        page.free_since = None
        self.in_use[size] += 1
        return block

    def take_free(self, size: int) -> Block | None:
        """take() of a block already free (no collecting, no carving), or None."""
        return self.take(size, carve=False) if self.free[size] else None

    def untake(self, block: Block) -> None:
        """A block taken, never handed out (the C fast path's stock): free
        again, as a block whose grace period ended."""
        self.in_use[block.size] -= 1
        self._freed(block)

    def requeue(self, block: Block, goal: int) -> None:
        """A block whose views all came back through the C fast path, which
        tagged it with ``goal`` then: it waits, as retire() makes it wait.
        Spills come in goal order (buffer_pool.py), so queues stay ascending."""
        block.goal = goal
        block.safe = False
        page = block.page
        page.last_goal = max(page.last_goal, goal)
        self.in_use[block.size] -= 1
        self.waiting[block.size].append(block)

    def give_back(self, block: Block) -> None:
        """A block taken but not handed out: free again."""
        block.page.out -= 1
        self.in_use[block.size] -= 1
        self.free[block.size].append(block)

    def collect(self, size: int) -> None:
        """Move waiting blocks whose grace period is over to the free list."""
        waiting = self.waiting[size]
        if self._debug:
            while waiting and waiting[0].safe:  # the domain ran its grace-period callback
                self._freed(waiting.popleft())
            return
        reached = self._domain.goal_reached
        while waiting and reached(waiting[0].goal):
            self._freed(waiting.popleft())

    def _freed(self, block: Block) -> None:
        page = block.page
        page.out -= 1
        if not page.out:
            page.free_since = time.monotonic()
        self.free[block.size].append(block)

    def _carve(self, size: int) -> Block | None:
        room = self._room[size]
        while room:
            page = room[-1]
            if page.carved < page.nblocks:
                block = Block(page, page.carved * size, size)
                page.carved += 1
                return block
            room.pop()
        return None

    def grow(self, size: int) -> Block | None:
        """A block from a page that changes class, or from a new page; None
        when neither fits under max_bytes."""
        for cls in self.classes:
            if cls != size:
                self.collect(cls)
        for page in self.pages:
            if page.block_size != size and self._is_free(page):
                self._recarve(page, size)
                return self.take(size, carve=True)
        if self.max_bytes is not None and self.bytes + self.page_size > self.max_bytes:
            return None
        page = Page(self.page_size)
        self.pages.append(page)
        self.bytes += self.page_size
        self._recarve(page, size)
        return self.take(size, carve=True)

    def _is_free(self, page: Page) -> bool:
        return page.out == 0 and (self._debug or self._domain.goal_reached(page.last_goal))

    def _recarve(self, page: Page, size: int) -> None:
        self._forget_blocks(page)
        page.block_size = size
        page.nblocks = self.page_size // size
        page.carved = 0
        self._room[size].append(page)

    def _forget_blocks(self, page: Page) -> None:
        old = page.block_size
        if old:  # its blocks are all free (out == 0): forget them
            self.free[old] = [b for b in self.free[old] if b.page is not page]
            self._room[old] = [p for p in self._room[old] if p is not page]

    def large(self, nbytes: int) -> Block | None:
        """A block of its own for a request above the largest class."""
        self._collect_large()
        if self.max_bytes is not None and self.bytes + nbytes > self.max_bytes:
            return None
        page = Page(nbytes, large=True)
        page.out = 1
        self.bytes += nbytes
        self.large_out += 1
        return Block(page, 0, nbytes)

    def _collect_large(self) -> None:
        waiting = self.large_waiting
        reached = self._domain.goal_reached
        while waiting and (waiting[0].safe if self._debug else reached(waiting[0].goal)):
            self.bytes -= waiting.popleft().size

    # -- releasing a block -------------------------------------------------

    def retire(self, block: Block) -> None:
        """All views of ``block`` are back. The design's deferred advance:
        goal = wr_seq + 2, read after the caller let go of the views, without
        advancing (acquire() polls with it, and poll() advances to it). Read
        under the pool's lock, so goals in each queue never decrease."""
        goal = self._domain.wr_seq + 2
        block.goal = goal
        block.safe = False
        if block.page.large:
            self.large_out -= 1
            self.large_waiting.append(block)
            return
        block.page.last_goal = goal
        self.in_use[block.size] -= 1
        self.waiting[block.size].append(block)

    def heads(self) -> dict[int, int]:
        """{size class (0: large blocks): the goal at the head of its waiting
        queue} for every queue that is not empty (the oldest block's goal:
        goals in a queue never decrease)."""
        queues = [*self.waiting.items(), (0, self.large_waiting)]
        return {size: w[0].goal for size, w in queues if w}

    # -- giving memory back --------------------------------------------------

    def trim(self, old_enough: Callable[[Page], bool]) -> int:
        """Give back every page that is wholly free, safe, and
        ``old_enough``; returns the bytes given back."""
        for cls in self.classes:
            self.collect(cls)
        given = 0
        for page in [p for p in self.pages if self._is_free(p) and old_enough(p)]:
            self._forget_blocks(page)
            self.pages.remove(page)
            self.bytes -= page.size
            self.trimmed += 1
            given += page.size
        return given

    def byte_counts(self) -> tuple[int, int, int]:
        """Bytes out, waiting, free (a page's uncarved room counts as free)."""
        out = sum(self.in_use[c] * c for c in self.classes)
        waiting = sum(len(self.waiting[c]) * c for c in self.classes)
        large_waiting = sum(b.size for b in self.large_waiting)
        out += self.bytes - sum(p.size for p in self.pages) - large_waiting
        waiting += large_waiting
        return out, waiting, self.bytes - out - waiting

    def clear(self) -> None:
        for table in (self.free, self.waiting, self._room):
            table.clear()
        self.pages.clear()
        self.large_waiting.clear()
        self.bytes = 0
