"""SharedArray: a growable array of numbers that readers index without a lock.

The design's list-array rule: when a list's storage is resized, the old
storage may not be freed while readers might still be reading it; it is
freed after a grace period. SharedArray does the same for a typed array
(the ``array`` module's typecodes), so readers get ``len(a)``, ``a[i]``,
iteration and a zero-copy ``view()`` with no lock, while writers append.

How a reader stays consistent: the array's state is one ``_Storage`` object
(a memoryview over the buffer, its capacity and the number of items
published). A reader loads it once and uses only that object.
* An append that fits writes the item past ``length`` (no reader reads
  there) and then stores ``length + 1``: a reader that sees the new length
  sees the item (the store comes after the write, and attribute stores
  publish what came before them).
* An append that does not fit copies into new storage twice the size and
  publishes it with one store of ``_store``; the old storage is handed back
  to the BufferPool, which reuses it only after a grace period. Readers
  still on the old storage read the old items, consistently.
Writers serialize on a lock. A reader must not keep a loaded storage (a
view, an iterator) across its next quiescent state when a pool is used.

Readers index the storage's shared memoryview (an item read touches no
export count) but never slice it: view(), slices and iteration make a fresh
view from the underlying memory, which is a ctypes byte array (see
buffer_pool.py, "Memory and views"). On free-threaded 3.13 a bytearray's
count of exports, and a memoryview's, is updated without atomics, so views
made and dropped by several readers at once corrupted it ("SystemError:
deallocated bytearray object has exported buffers",
``../shared/repros/pipeline/sharedarray_view_race.py``).

Without a pool, storage is plain memory that refcounting frees when the
last reader drops it, so no grace period is needed. With a pool, every
storage comes from it, however big (the pool serves sizes above its
largest class with a block of its own). With a
pool, readers must be protected (in a read section, or registered and
quiescing); on a debug-mode domain's pool the array is a
``CheckedSharedArray``, whose reads raise UnprotectedReadError otherwise.
"""

from __future__ import annotations

import array
import threading
from collections.abc import Iterable, Iterator
from typing import Any, cast, overload

from . import _fork
from .buffer_pool import BufferPool, byte_view, new_memory
from .default import check_domain
from .domain import Domain
from .errors import UnprotectedReadError

__all__ = ["SharedArray", "CheckedSharedArray"]

#: array typecodes a memoryview can be cast to ('u' and 'w' cannot).
TYPECODES = "".join(t for t in array.typecodes if t not in "uw")
INITIAL_CAPACITY = 8


def _cast(mv: memoryview[Any], typecode: str) -> memoryview[Any]:
    # typeshed types cast() per literal format; ours is checked in __init__.
    return cast("memoryview[Any]", mv.cast(typecode))  # type: ignore[call-overload]


class _Storage:
    __slots__ = ("mv", "capacity", "length", "raw", "buf", "offset")

    def __init__(self, mv: memoryview, capacity: int, raw: memoryview | None, buf: Any, offset: int) -> None:
        self.mv = mv  # cast to the typecode; item reads only, from readers
        self.capacity = capacity
        self.length = 0
        self.raw = raw  # the pool's view, to release; None if not pooled
        self.buf = buf  # the exporter, and where the items start in it
        self.offset = offset


class SharedArray:
    """``SharedArray(typecode, *, pool=None, domain=None)``"""

    def __new__(
        cls, typecode: str, *, pool: BufferPool | None = None, domain: Domain | None = None
    ) -> SharedArray:
        if cls is SharedArray and isinstance(pool, BufferPool) and pool.domain.debug:
            cls = CheckedSharedArray  # reads that check the reading thread
        return object.__new__(cls)

    __slots__ = ("_store", "_typecode", "_itemsize", "_pool", "_lock", "_closed", "__weakref__")

    def __init__(
        self, typecode: str, *, pool: BufferPool | None = None, domain: Domain | None = None
    ) -> None:
        if not isinstance(typecode, str):
            raise TypeError(f"typecode must be a str, one of {TYPECODES!r}; not {type(typecode).__name__}")
        if len(typecode) != 1 or typecode not in TYPECODES:
            raise ValueError(f"typecode must be one of {TYPECODES!r} (as the array module), got {typecode!r}")
        if pool is not None and not isinstance(pool, BufferPool):
            raise TypeError(f"pool must be a qsbr.BufferPool or None, not {type(pool).__name__}")
        check_domain(domain)
        if pool is not None and domain is not None and pool.domain is not domain:
            raise ValueError("the pool belongs to another domain: pass the pool's domain, or none")
        self._typecode = typecode
        self._itemsize = array.array(typecode).itemsize
        self._pool = pool
        self._lock = threading.Lock()
        self._closed = False
        self._store = self._allocate(INITIAL_CAPACITY)
        _fork.track(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    @property
    def typecode(self) -> str:
        return self._typecode

    @property
    def itemsize(self) -> int:
        return self._itemsize

    def __repr__(self) -> str:
        return f"<qsbr.SharedArray {self._typecode!r} len={len(self)}>"

    # -- readers: no lock ------------------------------------------------

    def __len__(self) -> int:
        return self._store.length

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i: int | slice) -> Any:
        s = self._store  # one load: everything below uses this version
        n = s.length
        if isinstance(i, slice):
            return self._fresh_view(s, n)[i].tolist()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"SharedArray index out of range (len {n})")
        return s.mv[i]

    def __iter__(self) -> Iterator[Any]:
        s = self._store
        return iter(self._fresh_view(s, s.length))

    def view(self) -> memoryview[Any]:
        """A read-only, zero-copy view of the items, valid until the calling
        thread's next quiescent state (the storage may then be reused)."""
        s = self._store
        return self._fresh_view(s, s.length).toreadonly()

    def tolist(self) -> list[Any]:
        s = self._store
        return self._fresh_view(s, s.length).tolist()

    def _fresh_view(self, s: _Storage, n: int) -> memoryview[Any]:
        start = s.offset
        return _cast(byte_view(s.buf, start, start + n * self._itemsize), self._typecode)

    # -- writers: serialized -------------------------------------------------

    def append(self, x: Any) -> None:
        with self._lock:
            self._check_open()
            s = self._store
            n = s.length
            if n == s.capacity:
                s = self._grow(s, n + 1)
            try:
                s.mv[n] = x  # past length: no reader looks here
            except ValueError:  # as array.array does: a value out of range overflows
                raise OverflowError(f"{x!r} does not fit in typecode {self._typecode!r}") from None
            s.length = n + 1  # publish (a bad item raised above: nothing changed)

    def extend(self, items: Iterable[Any]) -> None:
        # Converted first, outside the lock: a bad item changes nothing.
        buf = array.array(self._typecode, items)
        k = len(buf)
        if not k:
            return
        src = memoryview(buf)
        with self._lock:
            self._check_open()
            s = self._store
            n = s.length
            if n + k > s.capacity:
                s = self._grow(s, n + k)
            s.mv[n : n + k] = src
            s.length = n + k

    def _grow(self, old: _Storage, need: int) -> _Storage:
        new = self._allocate(max(need, 2 * old.capacity))
        n = old.length
        new.mv[:n] = old.mv[:n]
        new.length = n
        self._store = new  # one store publishes the new version
        if old.raw is not None and self._pool is not None:
            # The list-array rule: the old storage goes back to the pool,
            # which reuses it only after a grace period.
            self._pool.release(old.raw)
        return new

    def _allocate(self, capacity: int) -> _Storage:
        nbytes = capacity * self._itemsize
        pool = self._pool
        if pool is not None:
            raw = pool.acquire(nbytes)
            page, offset = pool._location(raw)
            return _Storage(_cast(raw, self._typecode), capacity, raw, page, offset)
        buf = new_memory(nbytes)
        return _Storage(_cast(byte_view(buf, 0, nbytes), self._typecode), capacity, None, buf, 0)

    def close(self) -> None:
        """Give the storage back to the pool (after a grace period); later
        writes raise, and the array reads as empty."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            old = self._store
            empty = new_memory(0)
            self._store = _Storage(_cast(byte_view(empty, 0, 0), self._typecode), 0, None, empty, 0)
            if old.raw is not None and self._pool is not None:
                self._pool.release(old.raw)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this SharedArray is closed")


class CheckedSharedArray(SharedArray):
    """A SharedArray on a debug-mode domain's pool: every read checks that
    the reading thread is protected (registered and attached)."""

    __slots__ = ()

    def _check_reader(self, what: str) -> None:
        assert self._pool is not None
        domain = self._pool.domain
        if not domain.is_attached():
            raise UnprotectedReadError.for_read(f"SharedArray.{what}", domain)

    def __len__(self) -> int:
        self._check_reader("__len__")
        return super().__len__()

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i: int | slice) -> Any:
        self._check_reader("__getitem__")
        return super().__getitem__(i)

    def __iter__(self) -> Iterator[Any]:
        self._check_reader("__iter__")
        return super().__iter__()

    def view(self) -> memoryview[Any]:
        self._check_reader("view")
        return super().view()

    def tolist(self) -> list[Any]:
        self._check_reader("tolist")
        return super().tolist()
