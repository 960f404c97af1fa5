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
    #: Registered threads, and how many of them are attached.
    threads: int
    attached: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
