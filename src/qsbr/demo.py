"""`qsbr demo`: a hot-swap under load, watched live.

Reader threads serve lookups from a shared lookup table that has an explicit
close() (think: a model, an mmap, a native handle). A writer swaps in a new
version every millisecond or so and retires the old one with QSBR. While it
runs the demo shows reads/s, swaps, grace periods/s, the backlog in items
and bytes, and stalls (a live rich view on a terminal when rich is
installed, one plain line per second otherwise). At the end it checks that
no reader ever touched a closed table and that every retired table was
closed exactly once, and exits non-zero if not.

``--stall`` adds the failure QSBR is known for: one reader stops reporting
quiescent states for a while (a request stuck on a lock, say) while the
writer keeps retiring 1 MiB tables. The domain has a hard cap on pending
bytes, so the writer waits instead of letting memory grow; the stall
detector names the stuck reader; when it recovers, everything is released.
The demo then also checks that pending bytes never passed the cap and that
the stalled reader was the one named.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from .domain import Domain
from .stall import StallReport

MiB = 1 << 20


class ClosedError(RuntimeError):
    """A lookup on a table whose close() has run: the bug QSBR prevents."""


class Table:
    """A versioned lookup table whose storage close() really frees."""

    __slots__ = ("version", "_data", "payload", "close_count")

    def __init__(self, version: int, size: int = 256, payload: int = 0) -> None:
        self.version = version
        self._data: dict[int, int] | None = {k: k * version for k in range(size)}
        # Stands for the memory a real resource holds (model weights, a map).
        self.payload: bytearray | None = bytearray(payload) if payload else None
        self.close_count = 0

    def lookup(self, key: int) -> int:
        data = self._data
        if data is None:
            raise ClosedError(f"table v{self.version} used after close()")
        return data[key]

    def nbytes(self) -> int:
        """What close() frees: the table and the payload (retire(size=))."""
        data = self._data
        n = sys.getsizeof(data) + 28 * len(data) if data is not None else 0
        return n + (len(self.payload) if self.payload is not None else 0)

    def close(self) -> None:
        self.close_count += 1
        self._data = None
        self.payload = None


@dataclass
class DemoReport:
    seconds: float
    readers: int
    reads: int
    swaps: int
    releases: int
    max_backlog: int
    max_backlog_bytes: int = 0
    cap_bytes: int | None = None
    stalls: list[StallReport] = field(default_factory=list)
    expected_stall: str | None = None
    violations: list[str] = field(default_factory=list)
    double_closes: int = 0
    never_closed: int = 0

    @property
    def ok(self) -> bool:
        if self.violations or self.double_closes or self.never_closed:
            return False
        if self.cap_bytes is not None and self.max_backlog_bytes > self.cap_bytes:
            return False
        if self.expected_stall is not None:
            return bool(self.stalls) and all(s.thread_name == self.expected_stall for s in self.stalls)
        return True


@dataclass
class Tick:
    """What the live view shows each refresh."""

    elapsed: float
    seconds: float
    reads_per_s: float
    swaps: int
    grace_periods_per_s: float
    releases: int
    pending: int
    peak_pending: int
    pending_bytes: int
    peak_pending_bytes: int
    cap_bytes: int | None
    full_waits: int
    stalls: list[StallReport]
    stuck: str


def _mib(n: int) -> str:
    """Bytes for people: KiB below 1 MiB, else MiB."""
    if n < MiB:
        return f"{n / 1024:,.0f} KiB"
    return f"{n / MiB:,.1f} MiB"


class PlainView:
    """One line per second: for logs, pipes and machines without rich."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._named = 0

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, t: Tick) -> None:
        line = (
            f"  {t.elapsed:5.1f}s  reads/s {t.reads_per_s:>11,.0f}  swaps {t.swaps:>6,}  "
            f"grace periods/s {t.grace_periods_per_s:>6,.0f}  releases {t.releases:>6,}  "
            f"backlog {t.pending:>3} ({_mib(t.pending_bytes)}, peak {_mib(t.peak_pending_bytes)}"
        )
        if t.cap_bytes is not None:
            line += f" of cap {_mib(t.cap_bytes)}"
        line += f")  stalls {len(t.stalls)}"
        if t.stuck:
            line += f"  [{t.stuck}]"
        print(line, file=self.stream, flush=True)
        for s in t.stalls[self._named :]:
            again = f" (report {s.report}: still stalled)" if s.report > 1 else ""
            print(
                f"  STALL: thread {s.thread_name!r} (ident {s.thread_ident}) has not quiesced for "
                f"{s.stalled_for:.1f} s, {s.grace_periods_behind} grace periods behind, "
                f"{_mib(s.pending_bytes)} pending{again}",
                file=self.stream,
                flush=True,
            )
        self._named = len(t.stalls)


class RichView:
    """A live table, redrawn four times a second (needs rich)."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console(file=stream)
        self._live = Live(console=self._console, refresh_per_second=4, transient=False)

    def __enter__(self) -> RichView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, t: Tick) -> None:
        from rich.table import Table as RichTable

        table = RichTable(title=f"qsbr demo  {t.elapsed:4.1f} / {t.seconds:.0f} s", show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("reads/s", f"{t.reads_per_s:,.0f}")
        table.add_row("swaps", f"{t.swaps:,}")
        table.add_row("grace periods/s", f"{t.grace_periods_per_s:,.0f}")
        table.add_row("releases", f"{t.releases:,}")
        table.add_row("backlog (items)", f"{t.pending:,}  (peak {t.peak_pending:,})")
        cap = "" if t.cap_bytes is None else f" of cap {_mib(t.cap_bytes)}"
        table.add_row("backlog (bytes)", f"{_mib(t.pending_bytes)}  (peak {_mib(t.peak_pending_bytes)}{cap})")
        if t.cap_bytes is not None:
            table.add_row("writer waits at the cap", f"{t.full_waits:,}")
        stall_text = "none"
        if t.stalls:
            stall_text = "\n".join(
                f"[red]{s.thread_name}[/red] (ident {s.thread_ident}): {s.stalled_for:.1f} s, "
                f"{s.grace_periods_behind} grace periods behind"
                for s in t.stalls
            )
        table.add_row("stalls", stall_text)
        if t.stuck:
            table.add_row("scenario", t.stuck)
        self._live.update(table)


def _make_view(stream: TextIO, live: bool | None) -> PlainView | RichView:
    if live is None:
        live = stream.isatty()
    if live:
        try:
            return RichView(stream)
        except ImportError:
            print("(install qsbr[live] for the live view: pip install 'qsbr[live]')", file=stream)
    return PlainView(stream)


def run_demo(
    seconds: float = 10.0,
    readers: int = 4,
    swap_interval: float = 0.001,
    out: TextIO | None = None,
    background: bool = True,
    stall: bool = False,
    live: bool | None = None,
) -> DemoReport:
    """Run the demo; ``stall`` adds a stuck reader, a byte cap and stall
    detection; ``live`` picks the view (None: rich on a terminal)."""
    stream: TextIO = out if out is not None else sys.stdout
    stalls: list[StallReport] = []
    cap = 32 * MiB if stall else None
    payload = MiB if stall else 0
    domain = Domain(
        background=background,
        max_pending_bytes=cap,
        stall_timeout=max(0.5, min(2.0, seconds / 5)) if stall else 10.0,
        on_stall=stalls.append,
    )
    current = [Table(0, payload=payload)]  # readers load current[0] without a lock
    tables = [current[0]]
    stop = threading.Event()
    reads = [0] * readers
    violations: list[str] = []
    # The --stall scenario: reader 0 stops quiescing from 1/5 to 3/5 of the run.
    stuck_from, stuck_until = seconds / 5, 3 * seconds / 5
    start = time.monotonic()
    stuck_state = [""]

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
                    if stall and k == 0 and stuck_from <= time.monotonic() - start < stuck_until:
                        # Stuck while holding `table` (no quiescent state):
                        # this is the thread the detector must name.
                        stuck_state[0] = "reader-0 is stuck holding a table"
                        while time.monotonic() - start < stuck_until and not stop.is_set():
                            time.sleep(0.01)
                            if table.lookup(key) != key * table.version:
                                violations.append("reader 0: table changed under it")
                        stuck_state[0] = "reader-0 recovered"
                    domain.quiescent()  # between requests: holds no table
        reads[k] = n

    swaps = 0

    def writer() -> None:
        nonlocal swaps
        with domain.registered():
            while not stop.is_set():
                new = Table(swaps + 1, payload=payload)
                tables.append(new)
                old, current[0] = current[0], new  # unlink the old version
                # Under the cap this may wait (counted as quiescent) until
                # the backlog has room again.
                domain.retire(old, Table.close, size=old.nbytes())
                swaps += 1
                domain.quiescent()
                with domain.detached():
                    time.sleep(swap_interval)

    threads = [threading.Thread(target=reader, args=(k,), name=f"reader-{k}") for k in range(readers)]
    threads.append(threading.Thread(target=writer, name="writer"))
    what = (
        f"qsbr demo: {readers} readers serve lookups from a shared table; a writer swaps it "
        f"every {swap_interval * 1000:.1f} ms and retires the old one ({seconds:.0f} s)"
    )
    if stall:
        what += (
            f"; each table holds 1 MiB, pending bytes are capped at {_mib(cap or 0)}, and reader-0 "
            f"stops quiescing from {stuck_from:.1f} s to {stuck_until:.1f} s"
        )
    print(what, file=stream, flush=True)
    start = time.monotonic()
    for t in threads:
        t.start()
    last_reads, last_gp, last_t = 0, 0, start
    view = _make_view(stream, live)
    tick = 0.25 if isinstance(view, RichView) else 1.0
    try:
        with view:
            while True:  # at least one update, however slow the start was
                time.sleep(max(0.0, min(tick, start + seconds - time.monotonic())))
                s = domain.stats()
                total, now = sum(reads), time.monotonic()
                dt = max(now - last_t, 1e-9)
                view.update(
                    Tick(
                        elapsed=now - start,
                        seconds=seconds,
                        reads_per_s=(total - last_reads) / dt,
                        swaps=swaps,
                        grace_periods_per_s=(s.grace_periods - last_gp) / dt,
                        releases=s.releases,
                        pending=s.pending,
                        peak_pending=s.peak_pending,
                        pending_bytes=s.pending_bytes,
                        peak_pending_bytes=s.peak_pending_bytes,
                        cap_bytes=cap,
                        full_waits=s.full_waits,
                        stalls=list(stalls),
                        stuck=stuck_state[0],
                    )
                )
                last_reads, last_gp, last_t = total, s.grace_periods, now
                if now >= start + seconds or violations:
                    break
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    elapsed = time.monotonic() - start
    # Retire the last version too, and wait for every release.
    with domain.registered():
        last, current[0] = current[0], Table(-1)
        domain.retire(last, Table.close, size=last.nbytes())
    domain.barrier(timeout=30)
    s = domain.stats()
    domain.close()
    report = DemoReport(
        seconds=elapsed,
        readers=readers,
        reads=sum(reads),
        swaps=swaps,
        releases=s.releases,
        max_backlog=s.peak_pending,
        max_backlog_bytes=s.peak_pending_bytes,
        cap_bytes=cap,
        stalls=list(stalls),
        expected_stall="reader-0" if stall else None,
        violations=violations,
        double_closes=sum(1 for t in tables if t.close_count > 1),
        never_closed=sum(1 for t in tables if t.close_count == 0),
    )
    _summarize(report, len(tables), stream.write)
    return report


def _summarize(report: DemoReport, ntables: int, write: Callable[[str], Any]) -> None:
    r = report
    write(
        f"done in {r.seconds:.1f} s: {r.reads:,} reads ({r.reads / r.seconds:,.0f}/s), "
        f"{r.swaps:,} swaps, {r.releases:,} releases, largest backlog {r.max_backlog} "
        f"({_mib(r.max_backlog_bytes)})\n"
    )
    if r.cap_bytes is not None:
        verdict = "within" if r.max_backlog_bytes <= r.cap_bytes else "PAST"
        peak, cap = _mib(r.max_backlog_bytes), _mib(r.cap_bytes)
        write(f"pending bytes peaked at {peak}: {verdict} the cap of {cap}\n")
    for s in r.stalls:
        if s.report == 1:  # a stall's first report; its repeats back off (stall.py)
            again = sum(1 for x in r.stalls if x.thread_ident == s.thread_ident and x.report > 1)
            write(
                f"stall reported: thread {s.thread_name!r} (ident {s.thread_ident}), no quiescent state "
                f"for {s.stalled_for:.1f} s, {s.grace_periods_behind} grace periods behind"
                f"{f', reported again {again} time(s) while it lasted' if again else ''}\n"
            )
    if r.expected_stall is not None and not r.stalls:
        write(f"FAILED: the stall of {r.expected_stall} was not reported\n")
    if r.ok:
        write(f"verified: no reader touched a closed table; all {ntables:,} tables closed exactly once\n")
    else:
        write(
            f"FAILED: {len(r.violations)} use-after-close, {r.double_closes} double closes, "
            f"{r.never_closed} never closed; first: {r.violations[:3]}\n"
        )
