"""Checking what callers pass, with one rule everywhere.

A value of the wrong *type* raises ``TypeError``; a value of the right type
that is out of range raises ``ValueError``. Every message names the
parameter, says what it accepts and shows what it got, so a caller can fix
the call without reading the source. ``bool`` is refused where an int is
wanted (``True`` is an int to Python, never to a caller).

``DomainOptions`` is a ``Domain``'s constructor arguments, checked once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DomainOptions",
    "check_callable",
    "check_choice",
    "check_int",
    "check_optional_int",
    "check_release",
    "check_seconds",
]


def check_int(name: str, value: object, minimum: int, meaning: str = "") -> int:
    """``value`` as an int >= ``minimum``. ``meaning`` (e.g. "bytes the
    release frees") is added to the messages."""
    if type(value) is int and value >= minimum:
        return value
    why = f" ({meaning})" if meaning else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}{why}, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{why}, got {value!r}")
    return int(value)  # an int subclass: a plain int from here on


def check_optional_int(name: str, value: object, minimum: int, meaning: str = "") -> int | None:
    """``check_int``, or None."""
    return None if value is None else check_int(name, value, minimum, meaning)


def check_seconds(name: str, value: object, *, none_means: str = "") -> float | None:
    """A duration in seconds, > 0. None is accepted only when ``none_means``
    says what it means (e.g. "no timeout")."""
    if value is None and none_means:
        return None
    or_none = f", or None for {none_means}" if none_means else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of seconds > 0{or_none}; not {type(value).__name__} {value!r}"
        )
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{name} must be > 0 seconds{or_none}; got {value!r}")
    return float(value)


def check_callable(name: str, value: object, accepts: str, *, allow_none: bool = True) -> None:
    """``value`` is callable (or None when allowed). ``accepts`` is how it is
    called, e.g. "callable(exc, obj)"."""
    if (value is None and allow_none) or callable(value):
        return
    or_none = " or None" if allow_none else ""
    raise TypeError(f"{name} must be {accepts}{or_none}, not {type(value).__name__} {value!r}")


def _quoted(choices: Collection[str]) -> str:
    names = [f'"{c}"' for c in choices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_release(release: object) -> None:
    """A release is called as ``release(obj)``. The hint shows the two forms
    that do that: ``obj.close`` (already bound) would be called as
    ``obj.close(obj)``."""
    if not callable(release):
        raise TypeError(
            "release must be a callable taking the retired object, e.g. "
            "retire(obj, type(obj).close) or retire(obj, lambda o: o.close()); "
            f"not {type(release).__name__} {release!r}"
        )


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    """``value`` is one of ``choices`` (strings, in the order given)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {_quoted(choices)}, not {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be {_quoted(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class DomainOptions:
    """A Domain's options, checked."""

    #: A thread advances wr_seq on every deferred_limit-th
    #: deferred_advance()/retire(); the calls between share one goal.
    deferred_limit: int
    #: How rd_seq is computed: "incremental" (a pass spread across polls,
    #: O(1) polls while a known laggard has not moved) or "flat" (the
    #: design's full scan on every poll). See scan.py.
    scan: str
    #: Start a reclaimer thread that polls, so that writers never run
    #: releases themselves. Without it, retire() polls every
    #: deferred_limit-th call and any poll()/barrier() runs what is ready.
    background: bool
    #: How often the reclaimer polls while work is pending, in seconds.
    reclaim_interval: float
    #: Called as on_release_error(exc, obj) when a release raises; by
    #: default the exception goes to sys.unraisablehook.
    on_release_error: Callable[[BaseException, Any], object] | None
    #: A thread also advances wr_seq and polls once the bytes it retired
    #: since its last advance exceed this (1 MiB by default, as CPython
    #: 3.14), so one retirement bigger than it is processed at once.
    deferred_bytes: int
    #: A hard cap on the backlog, in releases and in bytes (None: no cap).
    #: A retire() that would pass it blocks or raises, per on_full.
    max_pending: int | None
    max_pending_bytes: int | None
    #: "block": the retiring thread reclaims and waits, counted as quiescent
    #: while it waits, until the release fits. "raise": PendingLimitError,
    #: nothing queued. See admission.py.
    on_full: str
    #: Seconds an attached thread may go without a quiescent state while
    #: releases wait on it before it is reported as stalled (logger "qsbr",
    #: WARNING, once per stall); None turns stall detection off.
    stall_timeout: float | None
    #: Also called as on_stall(report) for each new stall.
    on_stall: Callable[[Any], object] | None
    #: A stall is also reported as soon as the bytes waiting behind the
    #: stalled thread pass this (64 MiB by default); None: by time only.
    stall_bytes: int | None
    #: Start a daemon thread that checks for stalls even when nobody polls.
    #: Off by default: no hidden thread (stall.py says when a stall can then
    #: go unreported).
    watchdog: bool
    #: In a child of os.fork(): "drop" forgets the parent's backlog (its
    #: releases never run in the child), "adopt" keeps it and runs it there.
    on_fork: str
    #: Debug mode: unprotected reads, double retirements and handles used
    #: from another thread raise. Also on with QSBR_DEBUG=1.
    debug: bool

    @classmethod
    def checked(
        cls,
        *,
        deferred_limit: object,
        scan: object,
        scan_strategies: Collection[str],
        background: object,
        reclaim_interval: object,
        on_release_error: object,
        deferred_bytes: object,
        max_pending: object,
        max_pending_bytes: object,
        on_full: object,
        stall_timeout: object,
        on_stall: object,
        stall_bytes: object,
        watchdog: object,
        on_fork: object,
        debug: object,
    ) -> DomainOptions:
        check_callable("on_release_error", on_release_error, "callable(exc, obj)")
        check_callable("on_stall", on_stall, "callable(report)")
        reclaim = check_seconds("reclaim_interval", reclaim_interval)
        assert reclaim is not None
        return cls(
            deferred_limit=check_int(
                "deferred_limit", deferred_limit, 1, "1 advances wr_seq on every retire"
            ),
            scan=check_choice("scan", scan, scan_strategies),
            background=bool(background),
            reclaim_interval=reclaim,
            on_release_error=on_release_error,  # type: ignore[arg-type]
            deferred_bytes=check_int("deferred_bytes", deferred_bytes, 1),
            max_pending=check_optional_int("max_pending", max_pending, 1),
            max_pending_bytes=check_optional_int("max_pending_bytes", max_pending_bytes, 1),
            on_full=check_choice("on_full", on_full, ("block", "raise")),
            stall_timeout=check_seconds("stall_timeout", stall_timeout, none_means="no stall detection"),
            on_stall=on_stall,  # type: ignore[arg-type]
            stall_bytes=check_optional_int("stall_bytes", stall_bytes, 1, "or None for no byte threshold"),
            watchdog=bool(watchdog),
            on_fork=check_choice("on_fork", on_fork, ("drop", "adopt")),
            debug=bool(debug) or os.environ.get("QSBR_DEBUG", "") not in ("", "0"),
        )
