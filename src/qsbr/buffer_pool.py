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
returned and every slice made from it have been released (``refs``). So a
producer receives once into a 64 KiB block and hands out many frames.

Invariants (all under the pool's lock):
* a block is in exactly one state: out (``refs`` views of it are in
  ``_out``), waiting (released, its grace period not known to be over), or
  free; goals in a class's waiting queue never decrease (each is read under
  the lock from wr_seq, which only grows), so only the head needs checking;
* the memory the pool holds (pages, and large blocks out or waiting) never
  passes ``max_bytes``.

Memory and views. Pages are ctypes byte arrays, not bytearrays: on
free-threaded 3.13 a bytearray's (an mmap's, a memoryview's) count of
exports is updated without atomics, so views made and dropped by several
threads at once corrupt it (a bytearray: 6 in 20 trials). A ctypes array
keeps no such count. Every view is made fresh from its page, never by
slicing a memoryview another thread also uses.

Debug mode (``debug=True``, or a debug-mode domain): a released block is
also retired to the domain, and when its grace period ends (at whichever
poll finds it safe) it is filled with 0xDB; only then may it be reused. The
next acquire() that hands it out checks the poison and raises
UseAfterReleaseError if a stale view wrote to it meanwhile. Views are held
weakly, and a block whose views are all gone, or were released by their
own context manager (``with pool.acquire(n) as v:``), without being given
back is reported on the "qsbr" logger.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from . import _fork
from .default import domain_or_default
from .domain import Domain
from .errors import PoolExhaustedError, UseAfterReleaseError
from .options import check_choice, check_int, check_optional_int, check_seconds
from .pool_debug import hold, report_leaks
from .pool_pages import POISON, Block, PageSet, byte_view, new_memory, poison
from .pool_stats import ClassStats, PoolStats

__all__ = ["BufferPool", "PoolStats", "ClassStats", "POISON", "new_memory", "byte_view"]

#: With this many blocks of a class waiting, acquire() polls the domain
#: before carving fresh ones: reuse keeps the pool small and cache-warm.
POLL_AFTER = 32
#: How often (in releases) release() looks for pages to give back.
TRIM_EVERY = 256
#: How often (in acquires) debug mode looks for views released but not given back.
LEAK_CHECK_EVERY = 256


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


class BufferPool:
    """Pages carved into size classes; blocks reused after a grace period."""

    #: What keeps the pages and blocks (a seam: tests inject broken ones).
    _pages_class = PageSet

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
        #: id(view) -> (view, or a weak reference to it in debug mode; its
        #: block, None for an empty view; where it starts in the page).
        self._out: dict[int, tuple[Any, Block | None, int]] = {}
        self._full_waits = self._exhausted = 0
        self._releases = self._acquires = 0
        #: Debug mode: ids of views garbage-collected since the last check
        #: (see _report_lost).
        self._dropped: collections.deque[int] = collections.deque()
        self._closed = False
        _fork.track(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

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
        with self._lock:
            # The common case, in one lock section: a free block, or a fresh
            # one carved while few blocks wait for their grace period.
            self._check_open()
            block = self._p.take(size, carve=len(self._p.waiting[size]) < POLL_AFTER)
            if block is not None:
                return self._hand_out(block, nbytes)
        pages = self._p
        return self._acquire_slow(nbytes, lambda: pages.take(size, carve=True) or pages.grow(size), timeout)

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
                self._put_out(view, None, 0)
            return view
        pages = self._p
        return self._acquire_slow(nbytes, lambda: pages.large(nbytes), timeout)

    def _acquire_slow(
        self, nbytes: int, attempt: Callable[[], Block | None], timeout: float | None
    ) -> memoryview:
        """Released blocks (of any class: a page may change class) may be
        safe by now: poll once, then try again; without room, wait or raise."""
        self._poll_for_waiting()
        with self._lock:
            self._check_open()
            self._maybe_trim()
            block = attempt()
            if block is not None:
                return self._hand_out(block, nbytes)
        return self._wait_for_room(nbytes, attempt, timeout)

    def _poll_for_waiting(self) -> None:
        """Outside our lock (a poll runs releases, which may use this pool):
        one poll to the newest head goal covers every class's oldest block."""
        with self._lock:
            heads = self._p.head_goals()
        if self._debug:
            if heads:
                self._domain.poll()  # runs the grace-period callbacks (see the module docstring)
        elif heads and not self._domain.goal_reached(max(heads)):
            self._domain.poll(max(heads))

    def _wait_for_room(
        self, nbytes: int, attempt: Callable[[], Block | None], timeout: float | None
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
            out, waiting, _ = self._p.byte_counts()
            heads = self._p.head_goals()
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

    def _size_class(self, nbytes: int) -> int:
        return self._classes[bisect_left(self._classes, nbytes)]

    def _put_out(self, view: memoryview, block: Block | None, start: int) -> None:
        """(Under the lock.) Enter a view in ``_out`` (off the hot paths,
        which inline the plain case)."""
        if self._debug:
            self._put_out_debug(view, block, start)
        else:
            self._out[id(view)] = (view, block, start)

    def _put_out_debug(self, view: memoryview, block: Block | None, start: int) -> None:
        """(Under the lock.) Debug mode keeps a view weakly, to report its
        block if the view is dropped unreleased (pool_debug.py). Such a view
        may have left its id to this one: look for lost blocks before its
        entry is overwritten, or that block would never be reported."""
        if id(view) in self._out:
            self._dropped.clear()
            self._check_leaks()
        elif self._dropped:
            self._check_dropped()
        pool_ref = weakref.ref(self)

        def dropped(ident: int) -> None:
            pool = pool_ref()
            if pool is not None:
                pool._report_lost(ident)

        self._out[id(view)] = (hold(view, dropped), block, start)

    def _hand_out(self, block: Block, nbytes: int) -> memoryview:
        """(Under the lock.) Debug mode checks the poison first."""
        if block.poisoned:
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
        view = byte_view(block.page.mem, block.offset, block.offset + nbytes)
        block.refs = 1
        if self._debug:
            self._acquires += 1
            if self._acquires % LEAK_CHECK_EVERY == 0:
                self._check_leaks()
            self._put_out_debug(view, block, block.offset)
        else:
            self._out[id(view)] = (view, block, block.offset)
        return view

    def _location(self, view: memoryview) -> tuple[Any, int]:
        """The page memory and offset of a view that is out (for
        SharedArray, which makes its readers' views from the page itself)."""
        with self._lock:
            _, block, offset = self._out[id(view)]
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
        with self._lock:
            if self._closed:
                raise ValueError("this BufferPool is closed")
            entry = self._out.get(id(view))
            # One view per entry, looked up by id(): the identity check tells
            # a view that is out from another object that reused its id.
            if entry is None or (entry[0]() if self._debug else entry[0]) is not view:
                raise ValueError("slice(): this view is not out: released already, or not from this pool")
            if not 0 <= start <= stop <= view.nbytes:
                raise ValueError(f"slice(): need 0 <= start <= stop <= {view.nbytes}, got {start}, {stop}")
            block = entry[1]
            if block is None:  # a slice of an empty view: empty
                new = memoryview(bytearray())
                self._put_out(new, None, 0)
                return new
            start += entry[2]
            new = memoryview(block.page.mem).cast("B")[
                start : stop + entry[2]
            ]  # fresh: see the module docstring
            block.refs += 1
            if self._debug:
                self._put_out_debug(new, block, start)
            else:
                self._out[id(new)] = (new, block, start)
            return new

    def release(self, view: memoryview) -> None:
        """Give a view back (one acquire() returned, or a slice), once no
        thread can newly get hold of it (it is out of every queue and
        structure: the unlink of retire()). Its block is reused only after a
        grace period, once all of its views are back, so readers that still
        hold the view are safe until their next quiescent state."""
        if view.__class__ is not memoryview:
            raise TypeError(f"release() needs a view from this pool, not {type(view).__name__}")
        with self._lock:
            if self._closed:
                raise ValueError("this BufferPool is closed")
            entry = self._out.pop(id(view), None)
            if entry is None or (entry[0]() if self._debug else entry[0]) is not view:
                if entry is not None:
                    self._out[id(view)] = entry
                raise ValueError(
                    "BufferPool.release(): this view is not out: it was released already, or it did "
                    "not come from this pool (pass a view acquire() or slice() returned, not a copy)"
                )
            block = entry[1]
            if block is None or block.refs > 1:
                if block is not None:
                    block.refs -= 1
                return
            block.refs = 0
            self._p.retire(block)
            self._releases += 1
            if self._releases % TRIM_EVERY == 0:
                self._maybe_trim()
        if self._debug:
            self._domain._retire_from_any_thread(block, self._grace_ended, 0)

    def _held(self, entry: tuple[Any, Block | None, int]) -> memoryview | None:
        held = entry[0]
        return held() if self._debug else held  # type: ignore[no-any-return]

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

    # -- giving memory back -------------------------------------------------

    def trim(self) -> int:
        """Give back every page whose blocks are all free and safe; returns
        the bytes given back."""
        with self._lock:
            self._check_open()
            return self._p.trim(lambda page: True)

    def _maybe_trim(self) -> None:
        """(Under the lock.) The rule: a page that has stayed wholly free for
        ``trim_after`` seconds is given back by the next acquire() that has
        to poll, or every TRIM_EVERY-th release()."""
        if self._trim_after is not None:
            cutoff = time.monotonic() - self._trim_after
            self._p.trim(lambda page: page.free_since is not None and page.free_since <= cutoff)

    # -- observers and lifetime ------------------------------------------

    def stats(self) -> PoolStats:
        with self._lock:
            if self._closed:
                return PoolStats(0, self._page_size, 0, self._max_bytes, {}, closed=True)
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
            self._p.clear()
            self._out.clear()

    def __enter__(self) -> BufferPool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this BufferPool is closed")

    # -- debug mode: blocks never given back ----------------------------------

    def _check_leaks(self, at_close: bool = False) -> None:
        """(Under the lock.) pool_debug.py: blocks never given back."""
        report_leaks(self._out.values(), at_close)

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
            lost = lost or ident in self._out
        if lost and not self._closed:
            self._check_leaks()


def _refuse_slice(view: object, start: object, stop: object) -> None:
    if not isinstance(view, memoryview):
        raise TypeError(f"slice() needs a view from this pool, not {type(view).__name__}")
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"slice(): {name} must be an int, not {type(value).__name__}")
