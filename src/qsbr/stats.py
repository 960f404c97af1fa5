"""A frozen snapshot of a domain's counters, returned by Domain.stats()."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DomainStats"]


@dataclass(frozen=True)
class DomainStats:
    """Counters of one Domain, read together (each is exact, the set is a
    snapshot taken while other threads may keep working)."""

    wr_seq: int
    rd_seq: int
    #: Times wr_seq was advanced (advance(), deferred_advance() every
    #: deferred_limit-th call, and the catch-up advances of poll/synchronize).
    advances: int
    #: poll() calls, and those that ran no release while work was pending.
    polls: int
    failed_polls: int
    #: Full scans of the thread registry (each computes rd_seq).
    scans: int
    #: Times rd_seq moved forward.
    grace_periods: int
    #: Items ever handed to retire()/defer() (= releases + pending).
    retired: int
    #: Releases that have run, and those that raised.
    releases: int
    release_errors: int
    #: Scheduled releases not yet run, and the largest backlog seen at a poll.
    pending: int
    max_pending: int
    #: Registered threads, and how many of them are attached / detached.
    threads: int
    attached: int
    detached: int
    #: Bytes the pending releases free (sizes given to retire()), the most
    #: seen (at polls, and exactly at every retire() under a cap), and the
    #: bytes freed by releases that have run.
    pending_bytes: int
    max_pending_bytes: int
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
