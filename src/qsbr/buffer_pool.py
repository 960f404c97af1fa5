"""BufferPool: zero-copy buffers that are reused only after a grace period.

A pool hands out blocks of big preallocated pages as memoryviews, so data
moves between threads without copies. The danger of any pool is reuse: a
block recycled while a reader still holds a view of it is overwritten under
that reader, silently (spdl#1636: 53 of 78 items corrupted). Here a
released block waits, tagged with a QSBR goal, until every thread that might
hold a view has passed a quiescent state; only then is it handed out again.

This is the design's mimalloc rule, for Python buffers:
* a page is carved into blocks of one size class;
* a released block is tagged with goal = wr_seq + 2 (a deferred advance:
  acquire's poll advances to it) and queued; it is reused once
  goal_reached(goal) (acquire polls the domain when the
  oldest waiting block is not ready yet);
* a page whose blocks are all back may serve *another* size class only
  after the goal of the last block released from it has been reached.

Invariants (all under the pool's lock):
* a block is in exactly one state: out (a view of it is live in
  ``_out``), waiting (released, goal not yet checked), or free;
* goals in a class's waiting queue never decrease (each is taken under the
  lock, from wr_seq which only grows), so only the head needs checking;
* ``page.out`` counts its blocks that are out or waiting with their goal not
  known to be reached; a page is re-carved only when it is 0 and its
  ``last_goal`` has been reached.

Releases need no registered thread, and the pool runs nothing in a
release callback.

Every view is made from the page's bytearray (``memoryview(page.buf)``), not
by slicing one shared memoryview of the page: on free-threaded 3.13,
slicing a memoryview that other threads also slice or drop loses updates
of its export count and can leave views "released" under their users
(CPython gh-155606). A fresh export per view keeps each view's bookkeeping
to the threads that use that view.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from . import _fork
from .default import domain_or_default
from .domain import Domain
from .options import check_int, check_optional_int

__all__ = ["BufferPool", "PoolStats", "ClassStats"]

POISON = 0xDB  # what debug=True writes over a block once it is safe
#: With this many blocks of a class waiting, acquire() polls the domain
#: before carving fresh ones: reuse keeps the pool small and cache-warm.
POLL_AFTER = 32


@dataclass(frozen=True)
class ClassStats:
    block_size: int
    #: Blocks handed out, released but waiting for their grace period, and
    #: free for reuse.
    in_use: int
    waiting: int
    free: int


@dataclass(frozen=True)
class PoolStats:
    pages: int
    page_size: int
    #: Bytes of all pages, and the cap (None: no cap).
    bytes: int
    max_bytes: int | None
    #: block size -> its blocks in use / waiting / free.
    classes: dict[int, ClassStats]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        """``stats["pages"]``: the fields, read as a mapping too."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


class _Page:
    __slots__ = ("buf", "block_size", "nblocks", "carved", "out", "last_goal")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)  # never resized: views of it stay valid
        self.block_size = 0
        self.nblocks = 0
        self.carved = 0  # blocks made so far (pages are carved lazily)
        self.out = 0
        self.last_goal = 0


class _Block:
    __slots__ = ("page", "offset", "size", "goal")

    def __init__(self, page: _Page, offset: int, size: int) -> None:
        self.page = page
        self.offset = offset
        self.size = size
        self.goal = 0


class BufferPool:
    """Pages carved into size classes; blocks reused after a grace period."""

    def __init__(
        self,
        size_classes: Iterable[int] = (64, 256, 1024, 4096, 16384, 65536),
        *,
        page_size: int = 1 << 20,
        max_bytes: int | None = None,
        debug: bool = False,
        domain: Domain | None = None,
    ) -> None:
        page_size = check_int("page_size", page_size, 1)
        try:
            given = list(size_classes)
        except TypeError:
            raise TypeError(
                f"size_classes must be an iterable of ints, not {type(size_classes).__name__}"
            ) from None
        if not given:
            raise ValueError("size_classes must not be empty")
        classes = sorted({check_int("each size class", c, 1) for c in given})
        if classes[-1] > page_size:
            raise ValueError(f"every size class must be <= page_size ({page_size}), got {classes[-1]}")
        max_bytes = check_optional_int("max_bytes", max_bytes, page_size, "at least one page")
        resolved = domain_or_default(domain)
        self._classes = classes
        self._largest = classes[-1]
        # nbytes -> size class, for the sizes up to 4 KiB (a list index is
        # cheaper than a bisect on the hot path).
        self._class_of = [0] + [
            classes[bisect_left(classes, n)] for n in range(1, min(classes[-1], 4096) + 1)
        ]
        self._page_size = page_size
        self._max_bytes = max_bytes
        self._debug = bool(debug)
        self._domain = resolved
        self._lock = threading.Lock()
        self._pages: list[_Page] = []
        self._free: dict[int, list[_Block]] = {c: [] for c in classes}
        self._waiting: dict[int, deque[_Block]] = {c: deque() for c in classes}
        self._room: dict[int, list[_Page]] = {c: [] for c in classes}  # pages with uncarved blocks
        self._in_use: dict[int, int] = dict.fromkeys(classes, 0)
        #: id(view) -> (view, block) for every view handed out and not released.
        self._out: dict[int, tuple[memoryview, _Block]] = {}
        self._closed = False
        _fork.track(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<qsbr.BufferPool classes={self._classes} pages={len(self._pages)}>"

    @property
    def domain(self) -> Domain:
        return self._domain

    @property
    def size_classes(self) -> tuple[int, ...]:
        return tuple(self._classes)

    @property
    def largest(self) -> int:
        return self._largest

    # -- acquire ---------------------------------------------------------

    def acquire(self, nbytes: int) -> memoryview:
        """A writable view of exactly ``nbytes``, from the smallest class
        that fits. MemoryError when a new page would pass max_bytes."""
        if nbytes.__class__ is not int or not 0 < nbytes <= self._largest:
            self._refuse(nbytes)
        size = self._class_of[nbytes] if nbytes < len(self._class_of) else self._size_class(nbytes)
        with self._lock:
            # The common case, in one lock section: a free block, or a fresh
            # one carved while few blocks wait for their grace period.
            if self._closed:
                raise ValueError("this BufferPool is closed")
            block: _Block | None = self._take(size, carve=len(self._waiting[size]) < POLL_AFTER)
            if block is not None:
                view = memoryview(block.page.buf)[block.offset : block.offset + nbytes]  # a fresh export
                self._out[id(view)] = (view, block)
                return view
            # Released blocks (of any class: a page may change class) may be
            # safe by now. One poll to the newest head goal covers every
            # class's oldest block.
            heads = [w[0].goal for w in self._waiting.values() if w]
            goal = max(heads) if heads else 0
        if goal and not self._domain.goal_reached(goal):
            # Outside our lock: a poll runs other releases, which may use
            # this pool.
            self._domain.poll(goal)
        with self._lock:
            self._check_open()
            block = self._take(size, carve=True) or self._grow(size)
            view = memoryview(block.page.buf)[block.offset : block.offset + nbytes]
            self._out[id(view)] = (view, block)
            return view

    def _refuse(self, nbytes: object) -> None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"acquire() needs an int number of bytes, not {type(nbytes).__name__}")
        if not 0 < nbytes <= self._largest:
            raise ValueError(
                f"acquire({nbytes}): sizes must be in 1..{self._largest} (the largest size class); "
                "allocate bigger buffers directly or add a larger class"
            )

    def _size_class(self, nbytes: int) -> int:
        return self._classes[bisect_left(self._classes, nbytes)]

    def _location(self, view: memoryview) -> tuple[bytearray, int]:
        """The page and offset of a view that is out (for SharedArray,
        which makes its readers' views from the page itself)."""
        with self._lock:
            block = self._out[id(view)][1]
            return block.page.buf, block.offset

    def _take(self, size: int, carve: bool) -> _Block | None:
        free = self._free[size]
        if not free:
            self._collect(size)
        block = free.pop() if free else self._carve(size) if carve else None
        if block is None:
            return None
        block.page.out += 1
        self._in_use[size] += 1
        return block

    def _collect(self, size: int) -> None:
        """Move waiting blocks whose goal is reached to the free list."""
        waiting = self._waiting[size]
        free = self._free[size]
        reached = self._domain.goal_reached
        while waiting and reached(waiting[0].goal):
            block = waiting.popleft()
            block.page.out -= 1
            if self._debug:  # same-size slice assignment: allowed while exported
                block.page.buf[block.offset : block.offset + block.size] = bytes([POISON]) * block.size
            free.append(block)

    def _carve(self, size: int) -> _Block | None:
        room = self._room[size]
        while room:
            page = room[-1]
            if page.carved < page.nblocks:
                block = _Block(page, page.carved * size, size)
                page.carved += 1
                return block
            room.pop()
        return None

    def _grow(self, size: int) -> _Block:
        # A page all of whose blocks are back, and safe, may change class.
        for cls in self._classes:
            if cls != size:
                self._collect(cls)
        reached = self._domain.goal_reached
        for page in self._pages:
            if page.block_size != size and page.out == 0 and reached(page.last_goal):
                self._recarve(page, size)
                block = self._carve(size)
                assert block is not None
                block.page.out += 1
                self._in_use[size] += 1
                return block
        total = (len(self._pages) + 1) * self._page_size
        if self._max_bytes is not None and total > self._max_bytes:
            raise MemoryError(
                f"BufferPool: a new {self._page_size:,}-byte page would pass max_bytes={self._max_bytes:,} "
                f"({len(self._out):,} views are out; released blocks wait for readers to quiesce)"
            )
        page = _Page(self._page_size)
        self._pages.append(page)
        self._recarve(page, size)
        block = self._carve(size)
        assert block is not None
        page.out += 1
        self._in_use[size] += 1
        return block

    def _recarve(self, page: _Page, size: int) -> None:
        old = page.block_size
        if old:
            # Its blocks are all free (out == 0): forget them.
            self._free[old] = [b for b in self._free[old] if b.page is not page]
            self._room[old] = [p for p in self._room[old] if p is not page]
        page.block_size = size
        page.nblocks = self._page_size // size
        page.carved = 0
        self._room[size].append(page)

    # -- release ---------------------------------------------------------

    def release(self, view: memoryview) -> None:
        """Give a view back, once no thread can newly get hold of it (it is
        out of every queue and structure: the unlink of retire()). Its block
        is reused only after a grace period, so readers that still hold the
        view (or slices of it) are safe until their next quiescent state."""
        with self._lock:
            if self._closed:
                raise ValueError("this BufferPool is closed")
            entry = self._out.pop(id(view), None)
            if entry is None or entry[0] is not view:
                if entry is not None:
                    self._out[id(view)] = entry
                raise ValueError(
                    "BufferPool.release(): this view is not out: it was released already, or it did not "
                    "come from this pool's acquire() (pass the view acquire() returned, not a slice or copy)"
                )
            block = entry[1]
            # The design's deferred advance: goal = wr_seq + 2, read after
            # the caller let go of the view, without advancing; acquire()
            # polls with this goal, and poll() advances to it. Read under
            # the lock, so goals in each queue never decrease.
            goal = self._domain.wr_seq + 2
            block.goal = goal
            block.page.last_goal = goal
            self._in_use[block.size] -= 1
            self._waiting[block.size].append(block)

    # -- observers and lifetime ------------------------------------------

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                pages=len(self._pages),
                page_size=self._page_size,
                bytes=len(self._pages) * self._page_size,
                max_bytes=self._max_bytes,
                classes={
                    c: ClassStats(c, self._in_use[c], len(self._waiting[c]), len(self._free[c]))
                    for c in self._classes
                },
            )

    def close(self) -> None:
        """Drop the pool's pages. Views still out stay valid (they keep their
        page alive); acquire() and release() raise from now on."""
        with self._lock:
            self._closed = True
            self._free.clear()
            self._waiting.clear()
            self._room.clear()
            self._out.clear()
            self._pages.clear()

    def __enter__(self) -> BufferPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this BufferPool is closed")
