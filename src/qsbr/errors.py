"""Exceptions raised by qsbr.

Every error says what went wrong and what to do about it: the caller should
never have to read the source to recover.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .domain import Domain
    from .stall import StallReport

__all__ = [
    "NotRegisteredError",
    "PendingLimitError",
    "PoolExhaustedError",
    "UnprotectedReadError",
    "UseAfterReleaseError",
]


class NotRegisteredError(RuntimeError):
    """The calling thread used a per-thread operation without registering.

    quiescent(), detach(), attach(), retire(), defer() and unregister() act on
    the calling thread's own state, so the thread must first call
    ``Domain.register()`` (or enter ``with domain.registered():``).
    """

    @classmethod
    def for_call(cls, what: str) -> NotRegisteredError:
        """The error for ``what()`` called from an unregistered thread."""
        return cls(
            f"{what}() needs the calling thread to be registered: call "
            "domain.register() first (or use `with domain.registered():`)"
        )


def unregistered_handle_error() -> NotRegisteredError:
    """The error for a ThreadHandle used after its thread left the domain."""
    return NotRegisteredError(
        "this ThreadHandle's thread is no longer registered: register() again and use the "
        "handle it returns (or domain.quiescent())"
    )


class PendingLimitError(RuntimeError):
    """retire() would take the backlog past the domain's hard cap.

    Raised only with ``Domain(on_full="raise")``. Nothing was queued: the
    caller still owns the object and may retry, call ``synchronize()`` and
    release it directly, or fix the thread(s) named in ``holders``, which are
    attached and have not reported a quiescent state since the oldest pending
    release was retired.
    """

    def __init__(
        self,
        *,
        pending: int,
        pending_bytes: int,
        size: int,
        max_pending: int | None,
        max_pending_bytes: int | None,
        holders: tuple[StallReport, ...],
    ) -> None:
        self.pending = pending
        self.pending_bytes = pending_bytes
        self.size = size
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.holders = holders
        caps = []
        if max_pending is not None:
            caps.append(f"{pending} of max_pending={max_pending} releases")
        if max_pending_bytes is not None:
            caps.append(f"{pending_bytes:,} of max_pending_bytes={max_pending_bytes:,} bytes")
        if holders:
            who = ", ".join(
                f"{h.thread_name!r} (ident {h.thread_ident}, {h.grace_periods_behind} grace periods behind)"
                for h in holders
            )
            why = f"reclamation is held back by {who}: it must call quiescent() or detach()"
        else:
            why = "no thread is holding reclamation back now; retry, or poll() first"
        super().__init__(
            f"retiring {size:,} more bytes would exceed the cap ({'; '.join(caps)} pending); "
            f"{why}. Nothing was queued: the object is still yours."
        )


class UnprotectedReadError(RuntimeError):
    """Debug mode: a thread read a shared structure (a Cell, a SharedArray)
    while it was not registered and attached, so nothing would have kept
    what it read from being released under it.

    Raised only in debug mode (``Domain(debug=True)`` or ``QSBR_DEBUG=1``);
    outside it such a read is silent, and unsafe.
    """

    @classmethod
    def for_read(cls, what: str, domain: Domain) -> UnprotectedReadError:
        import threading

        name = threading.current_thread().name
        state = "detached" if domain.is_registered() else "not registered"
        return cls(
            f"{what} was read by thread {name!r}, which is {state}: nothing keeps what it read "
            "from being released while it uses it. Read inside a read section, "
            "`with domain.attached(): ...` (one line for a request handler), or register() the "
            "thread and call quiescent() between uses. (Debug mode raises this; without it the "
            "read is silent.)"
        )


class PoolExhaustedError(MemoryError):
    """BufferPool.acquire() found no room under ``max_bytes``: with
    ``on_full="raise"`` at once, or with ``on_full="block"`` once its
    ``timeout`` ran out. Nothing was handed out.

    ``bytes_out`` are in views that have not been released; ``bytes_waiting``
    were released and wait for a grace period; ``holders`` are the threads
    whose missing quiescent state keeps them waiting.
    """

    def __init__(
        self,
        *,
        nbytes: int,
        max_bytes: int,
        bytes_out: int,
        bytes_waiting: int,
        holders: tuple[StallReport, ...],
        waited: float,
    ) -> None:
        self.nbytes = nbytes
        self.max_bytes = max_bytes
        self.bytes_out = bytes_out
        self.bytes_waiting = bytes_waiting
        self.holders = holders
        self.waited = waited
        if holders:
            who = ", ".join(f"{h.thread_name!r} (ident {h.thread_ident})" for h in holders)
            why = f"the waiting blocks are held back by {who}: it must call quiescent() or detach()"
        elif bytes_out:
            why = "most of the pool is in views not yet released: release() them (or raise max_bytes)"
        else:
            why = "raise max_bytes"
        after = f" after waiting {waited:.2f} s" if waited else ""
        super().__init__(
            f"BufferPool: no room for {nbytes:,} bytes under max_bytes={max_bytes:,}{after}: "
            f"{bytes_out:,} bytes are out, {bytes_waiting:,} wait for a grace period; {why}."
        )


class UseAfterReleaseError(RuntimeError):
    """Debug mode: a pool block was written after its release, through a
    view somebody kept (the poison written when its grace period ended was
    changed). Raised by the acquire() that would have handed it out."""
