"""Debug mode's guard against retiring one object twice.

``Domain(debug=True)`` (or ``QSBR_DEBUG=1``) keeps the ``id()`` of every
object retired and not yet released. Retiring an object whose id is there
raises ValueError: its release would run twice. The release is wrapped so
that the id leaves the set as the release begins (the release may hand the
object on to a next user, who may retire it again).
Pending objects are referenced by their deferred entries, so their ids
cannot be reused by other objects while they are in the set.

``defer(fn)`` is not guarded: deferring one callback twice is two calls,
not a double release. Cell asks ``check()`` before it unpublishes a value,
so a double retirement through a Cell changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PendingObjects"]


class PendingObjects:
    """The objects of one debug-mode domain that wait to be released."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: set[int] = set()  # set.add/discard/in are atomic on both builds

    def check(self, obj: Any) -> None:
        """ValueError if ``obj`` was retired and its release has not run."""
        if id(obj) in self._ids:
            raise ValueError(
                f"{obj!r} is already waiting to be released: it was retired before, and retiring "
                "it again would run its release twice. Retire each object once (a Cell value that "
                "was replaced must not be set again until its release has run)."
            )

    def track(self, obj: Any, release: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Check ``obj``, remember it, and return ``release`` wrapped so that
        it forgets ``obj`` once it has run."""
        self.check(obj)
        ids = self._ids
        ids.add(id(obj))

        def tracked_release(o: Any) -> Any:
            # Forget it before the release runs, not after: a release may
            # hand the object on (a pool gives a block back), and its next
            # user may retire it again before this call returns. Forgotten
            # after, that retirement would raise, and its id would then be
            # dropped by the finished release, unguarded.
            ids.discard(id(o))
            return release(o)

        return tracked_release

    def clear(self) -> None:
        """In a forked child that forgot its backlog: nothing is pending."""
        self._ids.clear()
