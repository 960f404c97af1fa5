"""How a domain is put together from its parts, and repaired in a child.

Each part is one concept of the design, in its own module; this module
wires them: who is given what. The rule: parts are given the other parts
they use (downward), and the domain's own operations (read wr_seq,
advance) only as weak methods, so that no part keeps the domain alive.

    DeferredWork  <- Registry (adopts a departing thread's backlog)
    GraceTiming   <- StallDetector, Reclamation (rd_seq covers advances)
    Registry      <- scanner, StallDetector
    StallDetector <- Reclamation, Admission
    Reclamation   <- Admission, ReclaimerThread (held weakly)
    Admission     <- DeferredWork (told what each batch freed)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .admission import Admission
from .deferred import DeferredWork
from .options import DomainOptions
from .reclaim import Reclamation
from .registry import Registry
from .scan import SCAN_STRATEGIES
from .stall import StallDetector
from .thread_state import ThreadState
from .timing import GraceTiming

__all__ = ["Parts", "assemble"]


@dataclass(frozen=True)
class Parts:
    """The parts of one domain."""

    registry: Registry
    work: DeferredWork
    timing: GraceTiming
    stalls: StallDetector
    reclaim: Reclamation
    admission: Admission | None  # None without a cap

    def new_locks(self, factory: Callable[[], Any]) -> None:
        """Every part's locks made anew by ``factory()`` (Domain._new_locks)."""
        for part in (self.registry, self.work, self.timing, self.stalls, self.reclaim, self.admission):
            if part is not None:
                part.new_locks(factory)

    def after_fork_in_child(self, survivor: ThreadState | None, drop: bool) -> None:
        """Repair every part in a child of os.fork(): only ``survivor`` (the
        forking thread's state, if it was registered) is still registered;
        the other threads' backlogs are adopted, or with ``drop`` every
        backlog is forgotten (Domain(on_fork=)); every lock is new."""
        departed = [st for st in self.registry if st is not survivor]
        self.registry.after_fork_in_child(survivor)
        self.timing.after_fork_in_child()
        self.reclaim.after_fork_in_child()
        if self.admission is not None:  # before the work: it gives dropped room back
            self.admission.after_fork_in_child()
        self.work.after_fork_in_child(departed, drop)
        self.stalls.after_fork_in_child()


def assemble(
    opts: DomainOptions, tls: threading.local, read_wr_seq: Callable[[], int], advance: Callable[[], int]
) -> Parts:
    """The parts of a domain with options ``opts`` and thread-local ``tls``;
    ``read_wr_seq`` and ``advance`` are the domain's, as weak methods."""
    work = DeferredWork()
    registry = Registry(tls, work)
    timing = GraceTiming()
    stalls = StallDetector(
        opts.stall_timeout,
        opts.on_stall,
        stall_bytes=opts.stall_bytes,
        watchdog=opts.watchdog,
        registry=registry,
        work=work,
        timing=timing,
        read_wr_seq=read_wr_seq,
        advance=advance,
    )
    reclaim = Reclamation(
        work=work,
        scanner=SCAN_STRATEGIES[opts.scan](registry),
        timing=timing,
        stalls=stalls,
        read_wr_seq=read_wr_seq,
        advance=advance,
        on_release_error=opts.on_release_error,
        tls=tls,
    )
    admission = None
    if opts.max_pending is not None or opts.max_pending_bytes is not None:
        admission = Admission(
            max_pending=opts.max_pending,
            max_pending_bytes=opts.max_pending_bytes,
            on_full=opts.on_full,
            reclaim=reclaim,
            stalls=stalls,
            read_wr_seq=read_wr_seq,
            advance=advance,
        )
        work.set_freed_hook(admission.freed)
    return Parts(registry, work, timing, stalls, reclaim, admission)
