"""A frozen snapshot of a domain's counters, returned by Domain.stats()."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .assembly import Parts

__all__ = ["DomainStats", "snapshot"]


@dataclass(frozen=True)
class DomainStats:
    """Counters of one Domain, read together (each is exact, the set is a
    snapshot taken while other threads may keep working)."""

    wr_seq: int
    rd_seq: int
    #: Times wr_seq was advanced (advance(), deferred_advance() every
    #: deferred_limit-th call, and the catch-up advances of poll/synchronize).
    advances: int
    #: poll() calls, and those that ran no release while work was pending;
    #: both count the polls retire() skipped because its own thread held
    #: rd_seq back (Domain._after_advance).
    polls: int
    failed_polls: int
    #: Full scans of the thread registry (each computes rd_seq).
    scans: int
    #: Times rd_seq moved forward.
    grace_periods: int
    #: Items ever handed to retire()/defer() (= releases + pending +
    #: forgotten_at_fork).
    retired: int
    #: Releases that have run, and those that raised.
    releases: int
    release_errors: int
    #: Scheduled releases not yet run, and the largest backlog seen (at
    #: polls, and exactly at every retire() under a cap).
    pending: int
    peak_pending: int
    #: Registered threads, and how many of them are attached / detached.
    threads: int
    attached: int
    detached: int
    #: Bytes the pending releases free (sizes given to retire()), the most
    #: seen (as peak_pending), and the bytes freed by releases that have run.
    pending_bytes: int
    peak_pending_bytes: int
    released_bytes: int
    #: Seconds: the longest grace period (from an advance of wr_seq until
    #: rd_seq reached it), and the age of the one in progress (0 if none).
    longest_grace_period: float
    current_grace_period: float
    #: Stalls reported (see Domain.stalled()).
    stalls: int
    #: retire() calls that waited on the hard cap (on_full="block"), and
    #: those that raised PendingLimitError (on_full="raise").
    full_waits: int
    limit_errors: int
    #: Releases a forked child of this process will never run (it kept only
    #: their objects): with Domain(on_fork="drop") its whole inherited
    #: backlog, and in any case what other threads were running at the fork.
    forgotten_at_fork: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def snapshot(wr_seq: int, advances: int, skipped_polls: int, parts: Parts) -> DomainStats:
    """Read every part's counters (each under its own lock) into one record.
    ``skipped_polls``: polls retire() skipped because they could find
    nothing (Domain._after_advance); each counts as a failed poll."""
    registry, work, reclaim = parts.registry, parts.work, parts.reclaim
    timing, stalls, admission = parts.timing, parts.stalls, parts.admission
    states = list(registry)
    attached = sum(1 for s in states if s.seq)
    counts = work.counts()
    rd_seq = reclaim.rd_seq
    current = timing.current(rd_seq)
    peak, peak_bytes = counts.peak_pending, counts.peak_pending_bytes
    if admission is not None:  # under a cap the reservations give the exact peak
        peak = max(peak, admission.peak_items)
        peak_bytes = max(peak_bytes, admission.peak_bytes)
    return DomainStats(
        wr_seq=wr_seq,
        rd_seq=rd_seq,
        advances=advances,
        polls=counts.polls + skipped_polls,
        failed_polls=counts.failed_polls + skipped_polls,
        scans=reclaim.scans,
        grace_periods=reclaim.grace_periods,
        retired=counts.released + counts.pending + counts.forgotten,
        releases=counts.released,
        release_errors=counts.errors,
        pending=counts.pending,
        peak_pending=peak,
        threads=len(states),
        attached=attached,
        detached=len(states) - attached,
        pending_bytes=counts.pending_bytes,
        peak_pending_bytes=peak_bytes,
        released_bytes=counts.released_bytes,
        longest_grace_period=max(timing.longest, current),
        current_grace_period=current,
        stalls=stalls.reported,
        full_waits=admission.full_waits if admission is not None else 0,
        limit_errors=admission.limit_errors if admission is not None else 0,
        forgotten_at_fork=counts.forgotten,
    )
