"""`qsbr demo`: a hot-swap under load.

Reader threads serve lookups from a shared lookup table that has an explicit
close() (think: a model, an mmap, a native handle). A writer swaps in a new
version every millisecond or so and retires the old one with QSBR. Each
second the demo prints reads/s, swaps, releases and the backlog; at the end it
checks that no reader ever touched a closed table and that every retired table
was closed exactly once, and exits non-zero if not.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from .domain import Domain


class ClosedError(RuntimeError):
    """A lookup on a table whose close() has run: the bug QSBR prevents."""


class Table:
    """A versioned lookup table whose storage close() really frees."""

    __slots__ = ("version", "_data", "close_count")

    def __init__(self, version: int, size: int = 256) -> None:
        self.version = version
        self._data: dict[int, int] | None = {k: k * version for k in range(size)}
        self.close_count = 0

    def lookup(self, key: int) -> int:
        data = self._data
        if data is None:
            raise ClosedError(f"table v{self.version} used after close()")
        return data[key]

    def close(self) -> None:
        self.close_count += 1
        self._data = None


@dataclass
class DemoReport:
    seconds: float
    readers: int
    reads: int
    swaps: int
    releases: int
    max_backlog: int
    violations: list[str] = field(default_factory=list)
    double_closes: int = 0
    never_closed: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations and self.double_closes == 0 and self.never_closed == 0


def run_demo(
    seconds: float = 10.0,
    readers: int = 4,
    swap_interval: float = 0.001,
    out: TextIO | None = None,
    background: bool = True,
) -> DemoReport:
    stream: TextIO = out if out is not None else sys.stdout
    domain = Domain(background=background)
    current = [Table(0)]  # the shared slot: readers load current[0] without a lock
    tables = [current[0]]
    stop = threading.Event()
    reads = [0] * readers
    violations: list[str] = []

    def reader(k: int) -> None:
        n = 0
        key = k
        with domain.registered():
            while not stop.is_set():
                table = current[0]
                try:
                    for _ in range(8):  # serve a few lookups from this version
                        key = (key * 31 + 7) & 255
                        if table.lookup(key) != key * table.version:
                            violations.append(f"reader {k}: wrong value from v{table.version}")
                except ClosedError as exc:
                    violations.append(f"reader {k}: {exc}")
                    return
                n += 8
                if n & 127 == 0:
                    reads[k] = n
                    domain.quiescent()  # between requests: holds no table
        reads[k] = n

    swaps = 0

    def writer() -> None:
        nonlocal swaps
        with domain.registered():
            while not stop.is_set():
                new = Table(swaps + 1)
                tables.append(new)
                old, current[0] = current[0], new  # unlink the old version
                domain.retire(old, Table.close)
                swaps += 1
                domain.quiescent()
                with domain.detached():
                    time.sleep(swap_interval)

    threads = [threading.Thread(target=reader, args=(k,), name=f"reader-{k}") for k in range(readers)]
    threads.append(threading.Thread(target=writer, name="writer"))
    print(
        f"qsbr demo: {readers} readers serve lookups from a shared table; a writer swaps it "
        f"every {swap_interval * 1000:.1f} ms and retires the old one ({seconds:.0f} s)",
        file=stream,
    )
    start = time.monotonic()
    for t in threads:
        t.start()
    last_reads, last_t = 0, start
    try:
        while (now := time.monotonic()) < start + seconds and not violations:
            time.sleep(min(1.0, start + seconds - now))
            s = domain.stats()
            total, now = sum(reads), time.monotonic()
            print(
                f"  {now - start:5.1f}s  reads/s {(total - last_reads) / (now - last_t):>12,.0f}  "
                f"swaps {swaps:>7,}  releases {s.releases:>7,}  backlog {s.pending:>4} "
                f"(max {s.max_pending})  grace periods {s.grace_periods:,}",
                file=stream,
            )
            last_reads, last_t = total, now
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    elapsed = time.monotonic() - start
    # Retire the last version too, and wait for every release.
    with domain.registered():
        last, current[0] = current[0], Table(-1)
        domain.retire(last, Table.close)
    domain.barrier(timeout=30)
    s = domain.stats()
    domain.close()
    report = DemoReport(
        seconds=elapsed,
        readers=readers,
        reads=sum(reads),
        swaps=swaps,
        releases=s.releases,
        max_backlog=s.max_pending,
        violations=violations,
        double_closes=sum(1 for t in tables if t.close_count > 1),
        never_closed=sum(1 for t in tables if t.close_count == 0),
    )
    print(
        f"done in {elapsed:.1f} s: {report.reads:,} reads ({report.reads / elapsed:,.0f}/s), "
        f"{report.swaps:,} swaps, {report.releases:,} releases, largest backlog {report.max_backlog}",
        file=stream,
    )
    if report.ok:
        print(
            f"verified: no reader touched a closed table; all {len(tables):,} tables closed exactly once",
            file=stream,
        )
    else:
        print(
            f"FAILED: {len(violations)} use-after-close, {report.double_closes} double closes, "
            f"{report.never_closed} never closed; first: {violations[:3]}",
            file=stream,
        )
    return report
