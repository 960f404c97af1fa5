"""Cell: one shared value that readers load without a lock.

The simplest QSBR structure, and the one most programs need: the current
model, config or routing table. Readers read ``cell.value`` (a plain slot
load, as cheap as any attribute) and must not keep what they read across
their next quiescent state. A writer publishes a new value with ``set()``;
the old one is *retired*: its ``release`` (close(), unmap, return to a pool)
runs once every thread that might still be using it has passed a quiescent
state. A reader must be inside a read section (``with domain.attached():``)
or registered and quiescing; in debug mode (``Domain(debug=True)`` or
``QSBR_DEBUG=1``) a read from anywhere else raises UnprotectedReadError.

Invariants:
* Writers serialize on the cell's lock: the load of the old value and the
  store of the new one are one step, so two set() calls never both retire
  the same old value (that would release it twice).
* The old value is retired after the store that unlinks it (program order),
  and outside the lock, so a release may itself call set(). Its size is
  asked (``size(old)``) and checked before that store, under the lock, and
  so is (in debug mode) that it is not already waiting to be released: a
  bad size or a double retirement changes nothing, and no value is ever
  unlinked without being retired.
* A value is never retired while it is still published: set(x) with the
  value already in the cell retires nothing.

How reads stay a plain attribute: ``value`` is a slot of ``Cell``. A cell of
a debug-mode domain is a ``CheckedCell``, whose ``value`` is a property that
checks the reading thread first; a closed cell becomes a ``ClosedCell``,
whose ``value`` raises. Writes go through the slot itself (``_VALUE``), never
through whichever ``value`` the instance's class shows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from . import _fork
from .default import domain_or_default
from .domain import Domain
from .errors import UnprotectedReadError
from .options import check_callable, check_int

__all__ = ["Cell", "CheckedCell", "ClosedCell"]

T = TypeVar("T")


class Cell(Generic[T]):
    """A shared value: lock-free reads, writes that retire the old value.

    ``Cell(value, release=None, *, domain=None, size=None)``: ``release(old)``
    runs for each replaced value once no reader can hold it (None: nothing
    to run, the old value is left to refcounting).
    """

    __slots__ = ("value", "_release", "_size", "_domain", "_lock", "_closed", "__weakref__", "__orig_class__")

    value: T
    _release: Callable[[T], Any] | None
    _size: Callable[[T], int] | None
    _domain: Domain
    _lock: threading.Lock
    _closed: bool

    def __new__(
        cls,
        value: T,
        release: Callable[[T], Any] | None = None,
        *,
        domain: Domain | None = None,
        size: Callable[[T], int] | None = None,
    ) -> Cell[T]:
        if cls is Cell and domain_or_default(domain).debug:
            cls = CheckedCell  # see the module docstring: reads that check
        return object.__new__(cls)

    def __init__(
        self,
        value: T,
        release: Callable[[T], Any] | None = None,
        *,
        domain: Domain | None = None,
        size: Callable[[T], int] | None = None,
    ) -> None:
        """``size(old)``, when given, is the bytes ``release(old)`` frees,
        for the domain's byte budget and cap (default: retire()'s estimate)."""
        check_callable("release", release, "callable (e.g. Cell(model, release=Model.close))")
        check_callable("size", size, "callable(value) -> bytes")
        resolved = domain_or_default(domain)
        _VALUE.__set__(self, value)
        _store = object.__setattr__
        _store(self, "_release", release)
        _store(self, "_size", size)
        _store(self, "_domain", resolved)
        _store(self, "_lock", threading.Lock())
        _store(self, "_closed", False)
        _fork.track(self)

    def _after_fork_in_child(self) -> None:
        object.__setattr__(self, "_lock", threading.Lock())

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "__orig_class__":  # Cell[int](...) records its alias
            object.__setattr__(self, name, value)
            return
        raise AttributeError(
            f"Cell.{name} cannot be assigned: use cell.set(new) (retires the old value), "
            "cell.exchange(new) or cell.compare_and_set(expected, new)"
        )

    def __repr__(self) -> str:
        if self._closed:
            return "<qsbr.Cell closed>"
        return f"<qsbr.Cell {_VALUE.__get__(self, Cell)!r}>"

    @property
    def domain(self) -> Domain:
        return self._domain

    def get(self) -> T:
        """The current value; no lock. Do not keep it across a quiescent state."""
        return self.value

    def set(self, new: T) -> None:
        """Publish ``new``; the old value is retired with ``release``."""
        release = self._release
        old, size = self._swap(new, retiring=release is not None)
        if release is not None and old is not new:
            self._domain._retire_from_any_thread(old, release, size)

    def exchange(self, new: T) -> T:
        """Publish ``new`` and hand the old value back; nothing is retired.
        The caller now owns the old value: readers may still be using it, so
        retire it (domain.retire) rather than closing it at once."""
        return self._swap(new, retiring=False)[0]

    def compare_and_set(self, expected: T, new: T) -> bool:
        """If the value *is* ``expected`` (identity), publish ``new``, retire
        the old value and return True; else change nothing and return False."""
        release = self._release
        with self._lock:
            self._check_open()
            old = _VALUE.__get__(self, Cell)
            if old is not expected:
                return False
            size = self._checked_retirement(old) if release is not None and old is not new else None
            _VALUE.__set__(self, new)
        if release is not None and old is not new:
            self._domain._retire_from_any_thread(old, release, size)
        return True

    def close(self) -> None:
        """Unpublish and retire the current value; later reads and writes
        raise ValueError. Idempotent."""
        release = self._release
        with self._lock:
            if self._closed:
                return
            old = _VALUE.__get__(self, Cell)
            size = self._checked_retirement(old) if release is not None else None
            object.__setattr__(self, "_closed", True)
            # Readers see "closed" from here on, then the value is unlinked.
            object.__setattr__(self, "__class__", ClosedCell)
            _VALUE.__delete__(self)
        if release is not None:
            self._domain._retire_from_any_thread(old, release, size)

    def _swap(self, new: T, retiring: bool) -> tuple[T, int | None]:
        """Publish ``new``; return the old value and, when it is to be
        retired, its size (checked before the store: see the invariants)."""
        with self._lock:  # writers serialize: see the module docstring
            self._check_open()
            old = _VALUE.__get__(self, Cell)
            size = self._checked_retirement(old) if retiring and old is not new else None
            _VALUE.__set__(self, new)
            return old, size

    def _checked_retirement(self, old: T) -> int | None:
        """What ``release(old)`` frees, by the ``size`` callable (checked as
        retire(size=) is; None: retire()'s own estimate). In debug mode,
        also that ``old`` is not already waiting to be released."""
        self._domain._check_not_pending(old)
        size = self._size
        return None if size is None else check_int("size", size(old), 0, "bytes the release frees")

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this Cell is closed: create a new one")


#: The slot that holds a Cell's value, whatever ``value`` the class shows.
_VALUE: Any = Cell.__dict__["value"]


class CheckedCell(Cell[T]):
    """A Cell of a debug-mode domain: every read checks that the reading
    thread is protected (registered and attached: in a read section, or
    quiescing)."""

    __slots__ = ()

    @property
    def value(self) -> T:  # type: ignore[override]
        domain = self._domain
        if not domain.is_attached():
            raise UnprotectedReadError.for_read("Cell.value", domain)
        return _VALUE.__get__(self, Cell)  # type: ignore[no-any-return]


class ClosedCell(Cell[T]):
    """What a Cell becomes when it is closed: reading raises ValueError, as
    a closed file's methods do."""

    __slots__ = ()

    @property
    def value(self) -> T:  # type: ignore[override]
        raise ValueError("this Cell is closed: cell.value is gone (create a new Cell)")
