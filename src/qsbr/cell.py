"""Cell: one shared value that readers load without a lock.

The simplest QSBR structure, and the one most programs need: the current
model, config or routing table. Readers read ``cell.value`` (a plain slot
load, as cheap as any attribute) and must not keep what they read across
their next quiescent state. A writer publishes a new value with ``set()``;
the old one is *retired*: its ``release`` (close(), unmap, return to a pool)
runs once every thread that might still be using it has passed a quiescent
state.

Invariants:
* Writers serialize on the cell's lock: the load of the old value and the
  store of the new one are one step, so two set() calls never both retire
  the same old value (that would release it twice).
* The old value is retired after the store that unlinks it (program order),
  and outside the lock, so a release may itself call set(). Its size is
  asked (``size(old)``) and checked before that store, under the lock: a
  bad size changes nothing, and no value is ever unlinked without being
  retired.
* A value is never retired while it is still published: set(x) with the
  value already in the cell retires nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from . import _fork
from .default import domain_or_default
from .domain import Domain
from .options import check_callable, check_int

__all__ = ["Cell"]

T = TypeVar("T")

_MISSING: Any = object()


class Cell(Generic[T]):
    """A shared value: lock-free reads, writes that retire the old value.

    ``Cell(value, release=None, *, domain=None)``: ``release(old)`` runs for
    each replaced value once no reader can hold it (None: nothing to run,
    the old value is left to refcounting).
    """

    __slots__ = ("value", "_release", "_size", "_domain", "_lock", "_closed", "__weakref__", "__orig_class__")

    value: T
    _release: Callable[[T], Any] | None
    _size: Callable[[T], int] | None
    _domain: Domain
    _lock: threading.Lock
    _closed: bool

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
        _store = object.__setattr__
        _store(self, "value", value)
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
        return f"<qsbr.Cell {self.value!r}>"

    @property
    def domain(self) -> Domain:
        return self._domain

    def get(self) -> T:
        """The current value; no lock. Do not keep it across a quiescent state."""
        try:
            return self.value
        except AttributeError:
            raise ValueError("this Cell is closed") from None

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
            old = self.value
            if old is not expected:
                return False
            size = self._size_of(old) if release is not None and old is not new else None
            object.__setattr__(self, "value", new)
        if release is not None and old is not new:
            self._domain._retire_from_any_thread(old, release, size)
        return True

    def close(self) -> None:
        """Unpublish and retire the current value; later reads and writes
        raise. Idempotent."""
        release = self._release
        with self._lock:
            if self._closed:
                return
            old = self.value
            size = self._size_of(old) if release is not None else None
            object.__setattr__(self, "_closed", True)
            object.__delattr__(self, "value")
        if release is not None:
            self._domain._retire_from_any_thread(old, release, size)

    def _swap(self, new: T, retiring: bool) -> tuple[T, int | None]:
        """Publish ``new``; return the old value and, when it is to be
        retired, its size (asked before the store: a size() that raises or
        returns a bad size changes nothing)."""
        with self._lock:  # writers serialize: see the module docstring
            self._check_open()
            old = self.value
            size = self._size_of(old) if retiring and old is not new else None
            object.__setattr__(self, "value", new)
            return old, size

    def _size_of(self, old: T) -> int | None:
        """What ``release(old)`` frees, by the ``size`` callable (checked as
        retire(size=) is), or None for retire()'s own estimate."""
        size = self._size
        return None if size is None else check_int("size", size(old), 0, "bytes the release frees")

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this Cell is closed: create a new one")
