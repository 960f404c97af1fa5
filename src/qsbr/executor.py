"""ThreadPoolExecutor: worker threads that take part in QSBR by themselves.

The design's "natural quiescent point" for CPython is the eval loop between
bytecodes; for Python code that runs as tasks, it is the moment between two
tasks: a worker that has finished a task holds nothing that task read. So
each worker is registered when it starts, is *attached* only while it runs
a task, reports a quiescent state when the task ends, and is *detached*
while it waits for work (a worker blocked on an empty queue never holds
reclamation back). Tasks read shared structures (a Cell, a SharedArray)
without doing anything about QSBR.

A task that blocks for a long time inside (I/O, a sleep) should still wrap
that call in ``with domain.detached():``; otherwise it holds releases back
for as long as it blocks (and the stall detector will say so).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from .default import domain_or_default
from .domain import Domain
from .options import check_callable

__all__ = ["ThreadPoolExecutor"]

R = TypeVar("R")


def _run_attached(domain: Domain, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
    domain.attach()  # seq = wr_seq before the task reads anything shared
    try:
        return fn(*args, **kwargs)
    finally:
        domain.quiescent()  # the task is over: it holds nothing it read
        domain.detach()  # and the worker waits for work detached


def _init_worker(domain: Domain, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
    domain.register()
    try:
        if initializer is not None:
            initializer(*initargs)
    finally:
        domain.detach()
    # A worker that exits (shutdown, idle timeout) is unregistered by itself.


class ThreadPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """A ``concurrent.futures.ThreadPoolExecutor`` whose workers are
    registered with ``domain`` (default: qsbr.default_domain()), attached
    only while they run a task, quiescent after each task, and detached
    while they wait. Every other argument is the standard one."""

    def __init__(
        self, max_workers: int | None = None, *, domain: Domain | None = None, **kwargs: Any
    ) -> None:
        self._qsbr_domain = domain_or_default(domain)
        initializer = kwargs.pop("initializer", None)
        initargs = tuple(kwargs.pop("initargs", ()))
        check_callable("initializer", initializer, "callable(*initargs)")
        super().__init__(
            max_workers,
            initializer=_init_worker,
            initargs=(self._qsbr_domain, initializer, initargs),
            **kwargs,
        )

    @property
    def domain(self) -> Domain:
        return self._qsbr_domain

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[R]:
        return super().submit(_run_attached, self._qsbr_domain, fn, args, kwargs)
