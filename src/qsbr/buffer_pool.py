"""BufferPool: zero-copy buffers that are reused only after a grace period.

A pool hands out blocks of big preallocated pages as memoryviews, so data
moves between threads without copies. The danger of any pool is reuse: a
block recycled while a reader still holds a view of it is overwritten under
that reader, silently (spdl#1636: 53 of 78 items corrupted). Here a released
block waits, tagged with a QSBR goal, until every thread that might hold a
view has passed a quiescent state; only then is it handed out again.

The design's mimalloc rule governs pages and blocks (pool_pages.py): a
released block is tagged with goal = wr_seq + 2 and reused once the goal is
reached; a page changes size class, or is given back (``trim()``), only
when its blocks are all back and the last one's goal is reached.

Frames: ``slice(view, start, stop)`` makes a view of part of a block that is
released on its own; a block goes back to the pool when the view acquire()
returned and every slice made from it have been released. So a producer
receives once into a 64 KiB block and hands out many frames.

slice() and release() take no lock (outside debug mode): a producer slicing
while workers release frames of the same block would otherwise hand the
pool's lock between threads once per frame, and on 2 cores that hand-off
cost more than the rest of the pipeline (docs/benchmarks.md, "Pipeline").
They use only single operations on a dict and a list, each atomic on every
build (the GIL, or the object's own lock on free-threaded 3.13). An out
block's views share one list of *tokens* (in their ``_out`` entries): its
bottom token is ``_LAST``, pushed when the block is handed out; slice()
pushes a token before it enters its new view in ``_out``; release() takes
the view out of ``_out`` (so only one caller can release it), then pops one
token. Invariant: a block's token list is at least as long as the number of
its views in ``_out``. So the release that pops ``_LAST`` finds no other view
of the block out, and it alone gives the block back (under the lock).
``_out`` is 64 dicts, a view's chosen by its id: one shared dict was the
next hand-off (a free-threaded dict has a lock of its own, and every thread
touched it for every frame).

Invariants (under the pool's lock, except the token counts above):
* a block is in exactly one state: out (views of it are in ``_out``),
  waiting (released, its grace period not known to be over), or free; goals
  in a class's waiting queue never decrease (each is read under the lock from
  wr_seq, which only grows), so only the head needs checking;
* the memory the pool holds (pages, and large blocks out or waiting) never
  passes ``max_bytes``.

Memory and views. Pages are ctypes byte arrays, not bytearrays: on
free-threaded 3.13 a bytearray's (an mmap's, a memoryview's) count of
exports is updated without atomics, so views made and dropped by several
threads at once corrupt it (a bytearray: 6 in 20 trials). A ctypes array
keeps no such count. Every view is made fresh from its page, never by
slicing a memoryview another thread also uses.

The C fast path. On the native kernel a plain pool (not in debug mode, its
hot methods and PageSet not overridden) has a ``PoolCore`` (_kernel.c, whose
header states its invariants B1-B7): ``pool.acquire``, ``pool.release`` and
``pool.slice`` are then the core's C methods. Per size class the core keeps
a stack of free blocks and a FIFO of released blocks tagged with goal =
wr_seq + 2; acquire() pops a free block, first moving the FIFO's heads
whose goal the domain's published rd_seq has reached (B5); on 3.13t the
tables are in shards, a thread's own first (B7). Each view it
makes is exported by a ``PoolLease`` (``view.obj``), so release() finds
the block from the view itself (no ``_out`` entry) and refuses a copy (B3).
Whatever the core cannot serve (a miss, a size above the largest class or
0, a view it did not make, any error) goes to this module's Python code,
the reference, which keeps the policy: carving, polling, pages, trim,
max_bytes, stats. The Python path hands its blocks out through the core
(``_hand_out``) and stocks it with up to STOCK free blocks; every block the
core holds counts as taken in the PageSet (B1), and ``_sync()`` takes the
core's free and waiting blocks back before anything that reads the PageSet's
(stats, trim, a page changing class, exhaustion). Without ctypes, on the
pure kernel, or in debug mode, there is no core and this module's code runs
alone; tests/test_pool_core.py runs the same steps on both and compares.

Debug mode (``debug=True``, or a debug-mode domain): a released block is
also retired to the domain, and when its grace period ends (at whichever
poll finds it safe) it is filled with 0xDB; only then may it be reused. The
next acquire() that hands it out checks the poison and raises
UseAfterReleaseError if a stale view wrote to it meanwhile. Views are held
weakly, and a block whose views are all gone, or were released by their
own context manager (``with pool.acquire(n) as v:``), without being given
back is reported on the "qsbr" logger (pool_debug.py). What acquire() does
when no block is free is in pool_backpressure.py.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from . import _fork, kernel
from .default import domain_or_default
from .domain import Domain
from .options import check_choice, check_int, check_optional_int, check_seconds
from .pool_backpressure import POLL_AFTER, Backpressure
from .pool_debug import DebugPool, is_released
from .pool_pages import HAS_ADDRESSES, OUT_SHARD_MASK, POISON, Block, PageSet, byte_view, new_memory
from .pool_stats import ClassStats, PoolStats

__all__ = ["BufferPool", "PoolStats", "ClassStats", "POISON", "new_memory", "byte_view"]

#: How often (in releases) release() looks for pages to give back.
TRIM_EVERY = 256
#: How many free blocks of a class the slow path hands the C fast path at a
#: time.
STOCK = 64
#: How often (in acquires) debug mode looks for views released but not given back.
LEAK_CHECK_EVERY = 256
#: The bottom token of an out block's token list (see the module docstring).
_LAST = object()

#: An ``_out`` entry: the view (a weak reference to it in debug mode); its
#: block, None for an empty view; where it starts in the page; the token list
#: its block's views share (None for an empty view).
_Entry = tuple[Any, Block | None, int, "list[object] | None"]


class _Lease:
    """``with pool.buffer(n) as view:`` acquire on enter, release on exit."""

    __slots__ = ("_pool", "_nbytes", "_timeout", "_view")

    def __init__(self, pool: BufferPool, nbytes: int, timeout: float | None) -> None:
        self._pool, self._nbytes, self._timeout = pool, nbytes, timeout
        self._view: memoryview | None = None

    def __enter__(self) -> memoryview:
        self._view = self._pool.acquire(self._nbytes, timeout=self._timeout)
        return self._view

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        view, self._view = self._view, None
        if view is not None:
            self._pool.release(view)


class BufferPool(Backpressure, DebugPool):
    """Pages carved into size classes; blocks reused after a grace period."""

    #: What keeps the pages and blocks (a seam: tests inject broken ones).
    _pages_class = PageSet
    #: Whether the C kernel's fast path may serve this pool (a seam: tests
    #: of the Python path's own tables turn it off).
    _native = True

    def __init__(
        self,
        size_classes: Iterable[int] = (64, 256, 1024, 4096, 16384, 65536),
        *,
        page_size: int = 1 << 20,
        max_bytes: int | None = None,
        debug: bool = False,
        domain: Domain | None = None,
        on_full: str = "block",
        trim_after: float | None = 30.0,
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
        self._on_full = check_choice("on_full", on_full, ("block", "raise"))
        self._trim_after = check_seconds("trim_after", trim_after, none_means="never trim by itself")
        self._classes = classes
        self._largest = classes[-1]
        # nbytes -> size class, for the sizes up to 4 KiB (a list index is
        # cheaper than a bisect on the hot path).
        self._class_of = [0] + [
            classes[bisect_left(classes, n)] for n in range(1, min(classes[-1], 4096) + 1)
        ]
        self._page_size = page_size
        self._max_bytes = max_bytes
        self._domain = resolved
        self._debug = bool(debug) or resolved.debug
        self._lock = threading.Lock()
        self._p = self._pages_class(classes, page_size, max_bytes, resolved, self._debug)
        #: id(view) -> its _Entry, in the shard ``id(view) >> 4 & OUT_SHARD_MASK``.
        self._out: list[dict[int, _Entry]] = [{} for _ in range(OUT_SHARD_MASK + 1)]
        #: Per class: acquire() polls the domain once this many blocks wait.
        self._poll_at: dict[int, int] = dict.fromkeys(classes, POLL_AFTER)
        self._full_waits = self._exhausted = 0
        self._releases = self._acquires = 0
        #: Debug mode: ids of views garbage-collected since the last check
        #: (see _report_lost).
        self._dropped: collections.deque[int] = collections.deque()
        self._closed = False
        #: Neither debug mode nor closed: slice() and release() take their
        #: inlined paths (one attribute load instead of two).
        self._fast = not self._debug
        self._class_index = {c: i for i, c in enumerate(classes)}
        self._next_spill = 0.0  # _maybe_trim's next spill of the core
        #: B6's count per class: blocks given back in a row with the newest goal.
        self._run: dict[int, int] = dict.fromkeys(classes, 0)
        #: The C fast path ("The C fast path" above), or None.
        self._core: Any = None
        if self._may_use_core():
            self._start_core()
        _fork.track(self)

    def _may_use_core(self) -> bool:
        cls = type(self)
        return (
            kernel.PoolCore is not None
            and self._native
            and not self._debug
            and self._pages_class is PageSet
            and HAS_ADDRESSES
            # A subclass that overrides a hot method keeps it.
            and all(getattr(cls, m) is getattr(BufferPool, m) for m in ("acquire", "release", "slice"))
        )

    def _start_core(self) -> None:
        core = kernel.PoolCore(
            self._domain,
            tuple(self._classes),
            _python_path(self, BufferPool._acquire_python),
            _python_path(self, BufferPool._release_python),
            _python_path(self, BufferPool._slice_python),
            None if self._trim_after is None else _python_path(self, BufferPool._trim_from_core),
            self._domain.advance,
            type(self._domain).advance is kernel.DomainCore.advance,
        )
        self._core = core
        # The hot methods, bound to the core: no Python frame on a hit. The
        # core passes every other call to the _python methods (the class's
        # own acquire/release/slice), which stay the reference.
        self.__dict__.update(acquire=core.acquire, release=core.release, slice=core.slice)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        if self._core is not None:
            self._core.after_fork_in_child()

    def _sync(self, size: int | None = None) -> None:
        """(Under the lock.) B1: take the core's free and waiting blocks of
        class ``size`` (every class: None) back into the PageSet, before
        anything reads its free or waiting blocks. A spill keeps each class's
        goal order (B2)."""
        if self._core is None:
            return
        free, waiting = self._core.spill(-1 if size is None else self._class_index[size])
        pages = self._p
        for block in free:
            pages.untake(block)
        # Shard by shard, each in goal order: one order for the queues (B2).
        waiting.sort(key=lambda entry: entry[1])
        for block, goal in waiting:
            pages.requeue(block, goal)

    def _stock(self, size: int) -> None:
        """(Under the lock.) Hand the core up to STOCK free blocks of class
        ``size``. Only free ones: carving ahead would hand out fresh blocks
        while safe ones wait uncollected (reuse first, as acquire() does)."""
        pages, core, index = self._p, self._core, self._class_index[size]
        for _ in range(STOCK):
            block = pages.take_free(size)
            if block is None:
                return
            core.stock(index, block, _address(block))

    def _trim_from_core(self) -> None:
        """Every 256th block the core takes back: the trim rule of release()."""
        with self._lock:
            if not self._closed:
                self._maybe_trim()

    def __repr__(self) -> str:
        return f"<qsbr.BufferPool classes={self._classes} pages={len(self._p.pages)}>"

    @property
    def domain(self) -> Domain:
        return self._domain

    @property
    def size_classes(self) -> tuple[int, ...]:
        return tuple(self._classes)

    @property
    def largest(self) -> int:
        return self._largest

    @property
    def debug(self) -> bool:
        return self._debug

    # -- acquire ---------------------------------------------------------

    def acquire(self, nbytes: int, *, timeout: float | None = None) -> memoryview:
        """A writable view of exactly ``nbytes``, from the smallest class that
        fits (a block of its own above the largest class; an empty view for
        0). Under ``max_bytes``, on_full decides: wait (counted as
        quiescent) up to ``timeout`` seconds, or PoolExhaustedError."""
        if nbytes.__class__ is not int or not 0 < nbytes <= self._largest:
            return self._acquire_other(nbytes, timeout)
        size = self._class_of[nbytes] if nbytes < len(self._class_of) else self._size_class(nbytes)
        pages = self._p
        if self._core is not None and not pages.waiting.get(size) and not pages.free.get(size):
            # (.get: a pool closed meanwhile has no classes; the path below says it is closed)
            view = self._core_missed(nbytes, size)
            if view is not None:
                return view
        with self._lock:
            # The common case, in one lock section: a free block, or a fresh
            # one carved while few blocks wait for their grace period (fewer
            # than _poll_at: see pool_backpressure.py).
            self._check_open()
            block = self._p.take(size, carve=self._waiting(size) < self._poll_at[size])
            if block is not None:
                return self._hand_out(block, nbytes)
        return self._acquire_slow(
            nbytes, lambda: pages.take(size, carve=True) or self._grow(size), timeout, size
        )

    #: The Python path of acquire() (the C fast path passes its misses here).
    _acquire_python = acquire

    def _grow(self, size: int) -> Block | None:
        """(Under the lock.) PageSet.grow, once the core holds nothing back:
        a page changes class only when all its blocks are free (B1)."""
        if self._core is not None:
            self._sync()
            block = self._p.take(size, carve=True)  # perhaps one the core held is safe now
            if block is not None:
                return block
        return self._p.grow(size)

    def _waiting(self, size: int) -> int:
        """(Under the lock.) Blocks of class ``size`` waiting for their grace period."""
        n = len(self._p.waiting[size])
        return n if self._core is None else n + self._core.waiting(self._class_index[size])[0]

    def _core_missed(self, nbytes: int, size: int) -> memoryview | None:
        """The C fast path found no block of the class ready, and the
        PageSet holds none of the class's (the common case: the core has
        them all). Once POLL_AFTER of them wait, one poll to the oldest one's
        goal, then the core again: a miss costs one poll, not the whole slow
        path. (To the oldest: B6 advanced for it already, so the poll only
        scans; an advance would double its cost, and the newer blocks get
        theirs from B6 too.) None: the caller's path decides (carve, grow,
        wait), and, if this poll failed, polls only once POLL_AFTER more
        wait."""
        core, index = self._core, self._class_index[size]
        waiting, head = core.waiting(index)
        if waiting < self._poll_at[size]:
            return None
        domain = self._domain
        if not domain.goal_reached(head):
            domain.poll(head)
        view: memoryview | None = core.try_acquire(nbytes)
        # (a plain store: a racing acquire of the class may set it too)
        self._poll_at[size] = POLL_AFTER + (0 if view is not None else core.waiting(index)[0])
        return view

    def _try_core(self, nbytes: int, size: int) -> memoryview | None:
        """After a poll: a block may be safe now, in the core's FIFO (B5) or
        among those a spill left in the PageSet (collected and stocked here:
        the core never looks there)."""
        if self._core is None:
            return None
        pages = self._p
        if pages.waiting.get(size) or pages.free.get(size):  # (a hint: read again under the lock)
            with self._lock:
                self._check_open()
                pages.collect(size)
                self._stock(size)
        view: memoryview | None = self._core.try_acquire(nbytes)
        return view

    def buffer(self, nbytes: int, *, timeout: float | None = None) -> _Lease:
        """``with pool.buffer(n) as view:`` the view is given back on exit.
        (``with pool.acquire(n) as view:`` only releases the memoryview, and
        the block is never given back: use this.)"""
        return _Lease(self, nbytes, timeout)

    def _acquire_other(self, nbytes: object, timeout: float | None) -> memoryview:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"acquire() needs an int number of bytes, not {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"acquire({nbytes}): a size must be >= 0")
        if nbytes == 0:  # an empty frame is legitimate: a view release() accepts
            view = memoryview(bytearray())
            with self._lock:
                self._check_open()
                self._put_out(view, None, 0, None)
            return view
        pages = self._p
        return self._acquire_slow(nbytes, lambda: pages.large(nbytes), timeout)

    def _size_class(self, nbytes: int) -> int:
        return self._classes[bisect_left(self._classes, nbytes)]

    def _put_out(
        self, view: memoryview, block: Block | None, start: int, tokens: list[object] | None
    ) -> None:
        """(Under the lock in debug mode.) Enter a view in ``_out`` (off the
        hot paths, which inline the plain case)."""
        if self._debug:
            self._put_out_debug(view, block, start, tokens)
        else:
            self._out[id(view) >> 4 & OUT_SHARD_MASK][id(view)] = (view, block, start, tokens)

    def _hand_out(self, block: Block, nbytes: int) -> memoryview:
        """(Under the lock.) Debug mode checks the poison first."""
        if block.poisoned:
            self._check_poison(block)
        core = self._core
        if core is not None and not block.page.large:
            # Out through a lease, so its release takes the fast path; and
            # the class's next acquires too.
            view: memoryview = core.hand_out(self._class_index[block.size], block, _address(block), nbytes)
            self._stock(block.size)
            return view
        view = byte_view(block.page.mem, block.offset, block.offset + nbytes)
        tokens: list[object] = [_LAST]  # a fresh list: a stale view's race can only touch the old one
        if self._debug:
            self._acquires += 1
            if self._acquires % LEAK_CHECK_EVERY == 0:
                self._check_leaks()
            self._put_out_debug(view, block, block.offset, tokens)
        else:
            self._out[id(view) >> 4 & OUT_SHARD_MASK][id(view)] = (view, block, block.offset, tokens)
        return view

    def _location(self, view: memoryview) -> tuple[Any, int]:
        """The page memory and offset of a view that is out (for
        SharedArray, which makes its readers' views from the page itself)."""
        with self._lock:
            if self._core is not None:
                where = self._core.location(view)
                if where is not None:
                    lent, start = where
                    return lent.page.mem, lent.offset + start
            block, offset = self._out[id(view) >> 4 & OUT_SHARD_MASK][id(view)][1:3]
            assert block is not None
            return block.page.mem, offset

    # -- release ---------------------------------------------------------

    def slice(self, view: memoryview, start: int, stop: int) -> memoryview:
        """A view of ``view[start:stop]`` that is released on its own: the
        block goes back to the pool once ``view`` and every slice made from
        it have been released. ``view`` must be out (acquired or sliced from
        this pool, not yet released)."""
        if view.__class__ is not memoryview or start.__class__ is not int or stop.__class__ is not int:
            _refuse_slice(view, start, stop)
        if self._fast:
            # _slice() inlined for a plain frame of a view that is out: each
            # attribute load and call costs on the free-threaded build.
            ident = id(view)
            out = self._out
            entry = out[ident >> 4 & OUT_SHARD_MASK].get(ident)
            if (
                entry is not None
                and entry[0] is view
                and entry[3] is not None
                and 0 <= start <= stop <= view.nbytes
            ):
                base = entry[2]
                # (tokens is None exactly when the block is: an empty view)
                new = memoryview(entry[1].page.mem).cast("B")[base + start : base + stop]  # type: ignore[union-attr]
                entry[3].append(None)  # the token first (module docstring)
                out[id(new) >> 4 & OUT_SHARD_MASK][id(new)] = (new, entry[1], base + start, entry[3])
                if out[ident >> 4 & OUT_SHARD_MASK].get(ident) is entry:
                    return new
                self._release(new)  # `view` was released meanwhile: undo, and let _slice() say so
        if self._debug:
            with self._lock:
                return self._slice(view, start, stop)
        return self._slice(view, start, stop)

    #: The Python path of slice() (the C fast path passes what it cannot serve).
    _slice_python = slice

    def _slice(self, view: memoryview, start: int, stop: int) -> memoryview:
        """(Lock-free outside debug mode: see the module docstring.)"""
        if self._closed:
            raise ValueError("this BufferPool is closed")
        out = self._out
        entry = out[id(view) >> 4 & OUT_SHARD_MASK].get(id(view))
        # One view per entry, looked up by id(): the identity check tells
        # a view that is out from another object that reused its id.
        if entry is None or (entry[0]() if self._debug else entry[0]) is not view:
            raise ValueError("slice(): this view is not out: released already, or not from this pool")
        if not 0 <= start <= stop <= view.nbytes:
            raise ValueError(f"slice(): need 0 <= start <= stop <= {view.nbytes}, got {start}, {stop}")
        block, base, tokens = entry[1], entry[2], entry[3]
        if block is None or tokens is None:  # a slice of an empty view: empty
            new = memoryview(bytearray())
            self._put_out(new, None, 0, None)
            return new
        new = memoryview(block.page.mem).cast("B")[
            base + start : base + stop
        ]  # fresh: see the module docstring
        tokens.append(None)  # first: from here the block cannot go back before `new` does
        if self._debug:
            self._put_out_debug(new, block, base + start, tokens)
        else:
            out[id(new) >> 4 & OUT_SHARD_MASK][id(new)] = (new, block, base + start, tokens)
        if out[id(view) >> 4 & OUT_SHARD_MASK].get(id(view)) is not entry:
            # `view` was released by another thread while we sliced it (a
            # race in the caller's code): perhaps the block is already on its
            # way back. Undo, as a release of `new` (its token, not the block).
            # (Never in debug mode, where the lock orders slice and release.)
            self._release(new)
            raise ValueError("slice(): this view was released while it was being sliced")
        return new

    def release(self, view: memoryview) -> None:
        """Give a view back (one acquire() returned, or a slice), once no
        thread can newly get hold of it (it is out of every queue and
        structure: the unlink of retire()). Its block is reused only after a
        grace period, once all of its views are back, so readers that still
        hold the view are safe until their next quiescent state."""
        if view.__class__ is not memoryview:
            raise TypeError(f"release() needs a view from this pool, not {type(view).__name__}")
        if self._fast:
            # _release() inlined for a view that is out (the common case).
            shard = self._out[id(view) >> 4 & OUT_SHARD_MASK]
            entry = shard.pop(id(view), None)  # atomic: of two racing releases, one gets it
            if entry is not None and entry[0] is view and not is_released(view):
                if entry[3] is not None and entry[3].pop() is _LAST:
                    with self._lock:  # the block's last view is back (the token invariant)
                        self._give_back(entry[1])  # type: ignore[arg-type] # (tokens: a block)
                return
            if entry is not None:
                shard[id(view)] = entry
            # _release() raises the error that fits.
        if self._debug:
            with self._lock:
                block = self._release(view)
            if block is not None:
                self._domain._retire_from_any_thread(block, self._grace_ended, 0)
        else:
            self._release(view)

    #: The Python path of release() (the C fast path passes what it cannot serve).
    _release_python = release

    def _release(self, view: memoryview) -> Block | None:
        """(Lock-free outside debug mode, until the block itself goes back.)
        Returns the block if this was its last view and debug mode is on."""
        if self._closed:
            raise ValueError("this BufferPool is closed")
        shard = self._out[id(view) >> 4 & OUT_SHARD_MASK]
        entry = shard.pop(id(view), None)  # atomic: of two racing releases, one gets it
        if entry is None or (entry[0]() if self._debug else entry[0]) is not view or is_released(view):
            if entry is not None:
                shard[id(view)] = entry
            if is_released(view):
                raise ValueError(
                    "BufferPool.release(): this view was released with memoryview.release() (as "
                    "`with pool.acquire(n) as v:` does) before it was given back: its block stays out. "
                    "Give views back with pool.release(), or use `with pool.buffer(n) as v:`"
                )
            raise ValueError(
                "BufferPool.release(): this view is not out: it was released already, or it did "
                "not come from this pool (pass a view acquire() or slice() returned, not a copy)"
            )
        block, tokens = entry[1], entry[3]
        if block is None or tokens is None or tokens.pop() is not _LAST:
            return None  # other views of the block are still out
        # The block's last view is back (no other view of it is in _out: the
        # token invariant), and only this caller popped _LAST.
        if self._debug:  # the caller holds the lock
            return self._give_back(block)
        with self._lock:
            return self._give_back(block)

    def _give_back(self, block: Block) -> Block | None:
        """(Under the lock.) The block waits for its grace period."""
        if self._closed:
            return None
        pages = self._p
        waiting = pages.waiting[block.size] if not block.page.large else None
        newest = waiting[-1].goal if waiting else None
        pages.retire(block)
        if waiting is not None and not self._debug:
            same = newest == block.goal
            # B6 (_kernel.c): POLL_AFTER blocks in a row with one goal (no
            # advance since the first came back): start their grace period
            # now, before the free blocks run out; polls need not advance.
            run = self._run[block.size] = (self._run[block.size] + 1) if same else 1
            if run >= POLL_AFTER:
                self._domain.advance()
        self._releases += 1
        if self._releases % TRIM_EVERY == 0:
            self._maybe_trim()
        return block if self._debug else None

    # -- giving memory back -------------------------------------------------

    def trim(self) -> int:
        """Give back every page whose blocks are all free and safe; returns
        the bytes given back."""
        with self._lock:
            self._check_open()
            self._sync()
            return self._p.trim(lambda page: True)

    def _maybe_trim(self) -> None:
        """(Under the lock.) The rule: a page that has stayed wholly free for
        ``trim_after`` seconds is given back by the next acquire() that has
        to poll, or every TRIM_EVERY-th release()."""
        if self._trim_after is not None:
            now = time.monotonic()
            if self._core is not None and now >= self._next_spill:
                # A page whose blocks the core holds is not free until they
                # come back: take them back now and then (the LIFO stocks
                # the most recent again; idle pages stay free and age).
                self._sync()
                self._next_spill = now + min(self._trim_after / 4, 1.0)
            cutoff = now - self._trim_after
            self._p.trim(lambda page: page.free_since is not None and page.free_since <= cutoff)

    # -- observers and lifetime ------------------------------------------

    def stats(self) -> PoolStats:
        with self._lock:
            if self._closed:
                return PoolStats(0, self._page_size, 0, self._max_bytes, {}, closed=True)
            self._sync()
            p = self._p
            out, waiting, free = p.byte_counts()
            return PoolStats(
                pages=len(p.pages),
                page_size=self._page_size,
                bytes=p.bytes,
                max_bytes=self._max_bytes,
                classes={
                    c: ClassStats(c, p.in_use[c], len(p.waiting[c]), len(p.free[c])) for c in self._classes
                },
                bytes_out=out,
                bytes_waiting=waiting,
                bytes_free=free,
                large_blocks=p.large_out + len(p.large_waiting),
                large_bytes=p.bytes - sum(page.size for page in p.pages),
                trimmed_pages=p.trimmed,
                full_waits=self._full_waits,
                exhausted=self._exhausted,
            )

    def close(self) -> None:
        """Drop the pool's pages. Views still out stay valid (they keep their
        memory alive); acquire(), slice() and release() raise from now on."""
        with self._lock:
            if self._closed:
                return
            if self._debug:
                self._dropped.clear()
                self._check_leaks(at_close=True)
            self._closed = True
            self._fast = False
            if self._core is not None:
                self._core.close()  # views out stay valid: each lease holds its block's page
            self._p.clear()
            for shard in self._out:
                shard.clear()

    def __enter__(self) -> BufferPool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this BufferPool is closed")


def _address(block: Block) -> int:
    """The address of ``block``'s first byte (the core needs ctypes pages)."""
    addr = block.page.addr
    assert addr is not None, "the C fast path runs only on ctypes pages"
    return addr + block.offset


def _python_path(pool: BufferPool, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (a BufferPool function) called on ``pool`` through a weak
    reference: the core the pool holds must not keep it alive."""
    ref = weakref.ref(pool)

    def call(*args: Any, **kwargs: Any) -> Any:
        obj = ref()
        if obj is None:
            raise ReferenceError("this BufferPool no longer exists")
        return func(obj, *args, **kwargs)

    call.__qualname__ = f"BufferPool.{func.__name__} (Python path)"
    return call


def _refuse_slice(view: object, start: object, stop: object) -> None:
    if not isinstance(view, memoryview):
        raise TypeError(f"slice() needs a view from this pool, not {type(view).__name__}")
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"slice(): {name} must be an int, not {type(value).__name__}")
