"""Report an exception from a release through sys.unraisablehook.

A release runs far from the retire() that scheduled it, so its exception
has no caller to propagate to: it is "unraisable", like an exception in
``__del__``. CPython's default hook only accepts its own
``UnraisableHookArgs`` struct type, which Python code cannot name, so we
obtain that type once by letting CPython report a probe exception while a
capturing hook is installed; any other report that arrives in that window is
passed on to the hook that was installed before, so nothing is swallowed.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["report_unraisable"]

_lock = threading.Lock()
_args_type: Callable[[tuple[Any, ...]], Any] | None = None


class _Probe(Exception):
    pass


class _RaisesInDel:
    def __del__(self) -> None:
        raise _Probe


def _find_args_type() -> Callable[[tuple[Any, ...]], Any] | None:
    global _args_type
    with _lock:
        if _args_type is None:
            found: list[Any] = []
            previous = sys.unraisablehook

            def capture(args: Any) -> None:
                if isinstance(args.exc_value, _Probe):
                    found.append(type(args))
                else:
                    previous(args)

            sys.unraisablehook = capture
            try:
                _RaisesInDel()  # destroyed at once: its __del__ raises
            finally:
                sys.unraisablehook = previous
            if found:
                _args_type = found[0]
        return _args_type


def report_unraisable(exc: BaseException, obj: object, msg: str) -> None:
    """Hand ``exc`` to sys.unraisablehook with ``obj`` as the object."""
    tb: TracebackType | None = exc.__traceback__
    args_type = _find_args_type()
    try:
        if args_type is None:
            raise TypeError("UnraisableHookArgs type not available")
        sys.unraisablehook(args_type((type(exc), exc, tb, msg, obj)))
    except Exception:
        # The hook itself failed: never lose the report.
        print(f"{msg}: {obj!r}", file=sys.stderr)
        traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
