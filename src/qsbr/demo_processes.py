"""`qsbr demo --processes N`: a table published to reader processes, one killed.

A writer process publishes a lookup table (4,096 entries, 32 KiB, each entry
derived from the table's version) through a SharedCell several hundred times
a second. N reader processes serve lookups from the current table, zero-copy,
quiescent after each, and check every answer against the version they read
(and, every 256 reads, the whole table's checksum). A while in, the demo
SIGKILLs one reader: its slot is evicted at the next scan (a WARNING names its
pid) and reclamation goes on. The live view shows reads/s per process, the
eviction, the arena and the unlinks waiting; the run ends with the verdict:
no torn read, nothing left in /dev/shm.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import random
import signal
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, TextIO

from .shared_cell import SharedCell

ENTRIES = 4096
MULT = 1_000_003
HEADER = struct.Struct("<QI4x")  # version, crc32 of the entries

# Counters each child keeps in the shared array (per process, 4 slots).
READS, BAD, PUBLISHES, READY = 0, 1, 2, 3
PER = 4


def make_table(version: int) -> bytes:
    entries = struct.pack(f"<{ENTRIES}Q", *(version * MULT + k for k in range(ENTRIES)))
    return HEADER.pack(version, zlib.crc32(entries)) + entries


def check_table(view: memoryview, key: int, full: bool) -> bool:
    """Whether ``view`` answers ``key`` as its own version says (and, with
    ``full``, whether every entry matches the checksum)."""
    if len(view) == 0:
        return True
    version, crc = HEADER.unpack_from(view)
    (value,) = struct.unpack_from("<Q", view, HEADER.size + 8 * key)
    if value != version * MULT + key:
        return False
    return not full or zlib.crc32(view[HEADER.size :]) == crc


def _reader(name: str, counters: Any, index: int, stop: Any) -> None:
    cell = SharedCell(name)
    handle = cell.domain.register()
    rng = random.Random(index)
    base = index * PER
    counters[base + READY] = 1
    reads = bad = 0
    while not stop.value:
        for _ in range(256):
            view = cell.read()
            if not check_table(view, rng.randrange(ENTRIES), full=False):
                bad += 1
            del view
            handle.quiescent()
        view = cell.read()
        if not check_table(view, 0, full=True):
            bad += 1
        del view
        handle.quiescent()
        reads += 257
        counters[base + READS] = reads
        counters[base + BAD] = bad
    cell.close()


def _writer(name: str, counters: Any, index: int, stop: Any, interval: float) -> None:
    cell = SharedCell(name)
    base = index * PER
    counters[base + READY] = 1
    version = cell.version
    while not stop.value:
        version += 1
        cell.publish(make_table(version))
        counters[base + PUBLISHES] = version
        time.sleep(interval)
    cell.close()


@dataclass
class ProcessDemoReport:
    seconds: float
    reads: int
    torn: int
    publishes: int
    killed_pid: int
    evicted: int
    leaked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.torn == 0 and not self.leaked and self.evicted >= 1 and self.reads > 0


def _line(elapsed: float, rates: list[tuple[str, float]], cell: SharedCell, killed: str) -> str:
    s = cell.stats()
    d = cell.domain.stats()
    per = "  ".join(f"{label} {rate / 1000:>7,.0f}k" for label, rate in rates)
    return (
        f"  {elapsed:5.1f}s  reads/s {per}  version {s['version']:>6,}  evicted {d.evicted}  "
        f"arena {s['used'] / 1024:,.0f} of {s['capacity'] / 1024:,.0f} KiB  "
        f"unlinks waiting {d.pending_unlinks}"
        f"{'  [' + killed + ']' if killed else ''}"
    )


def run_process_demo(
    processes: int = 4, seconds: float = 10.0, out: TextIO | None = None, live: bool | None = None
) -> ProcessDemoReport:
    """Run the demo with ``processes`` reader processes and one writer."""
    stream: TextIO = out if out is not None else sys.stdout
    ctx = mp.get_context("spawn")
    cell = SharedCell(create=True, capacity=1 << 20)
    counters = ctx.Array(ctypes.c_int64, (processes + 1) * PER, lock=False)
    stop: Any = ctx.Value(ctypes.c_int, 0, lock=False)
    # The eviction's WARNING, where the demo's reader can see it.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("  %(levelname)s %(message)s"))
    log = logging.getLogger("qsbr")
    log.addHandler(handler)
    procs = [
        ctx.Process(target=_reader, args=(cell.name, counters, k, stop), daemon=True)
        for k in range(processes)
    ]
    procs.append(ctx.Process(target=_writer, args=(cell.name, counters, processes, stop, 0.002), daemon=True))
    killed_pid = 0
    leaked: list[str] = []
    reads = torn = publishes = evicted = 0
    try:
        print(
            f"qsbr demo: 1 writer process publishes a {ENTRIES * 8 // 1024} KiB table through a SharedCell; "
            f"{processes} reader processes serve lookups from it; one reader is SIGKILLed at "
            f"{seconds * 0.4:.0f} s",
            file=stream,
            flush=True,
        )
        for p in procs:
            p.start()
        deadline = time.monotonic() + 60
        while not all(counters[k * PER + READY] for k in range(processes + 1)):
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("the demo's processes did not start")
            time.sleep(0.02)
        view = _make_view(stream, live)
        start = last = time.monotonic()
        before = [counters[k * PER + READS] for k in range(processes)]
        killed = ""
        kill_at = seconds * 0.4
        # The demo's own poller: an observer that registers nothing and polls,
        # as a supervisor would (the writer polls too, when its arena fills).
        with view:
            while True:
                time.sleep(0.25)
                now = time.monotonic()
                elapsed = now - start
                if not killed_pid and elapsed >= kill_at:
                    victim = procs[0]
                    assert victim.pid is not None
                    killed_pid = victim.pid
                    os.kill(killed_pid, signal.SIGKILL)
                    killed = f"reader pid {killed_pid} SIGKILLed at {elapsed:.1f} s"
                cell.domain.poll()
                current = [counters[k * PER + READS] for k in range(processes)]
                rates = [
                    (
                        f"p{k + 1}" + ("(killed)" if k == 0 and killed_pid else ""),
                        (current[k] - before[k]) / (now - last),
                    )
                    for k in range(processes)
                ]
                before, last = current, now
                view.update(_line(elapsed, rates, cell, killed))
                if elapsed >= seconds:
                    break
        stop.value = 1
        for p in procs:
            p.join(30)
        reads = sum(counters[k * PER + READS] for k in range(processes))
        torn = sum(counters[k * PER + BAD] for k in range(processes))
        publishes = counters[processes * PER + PUBLISHES]
        # The killed reader's slot must be gone even if no scan met it yet.
        cell.domain.synchronize(timeout=10)
        evicted = cell.domain.stats().evicted
    finally:
        stop.value = 1
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        cell.close()
        cell.unlink()
        log.removeHandler(handler)
    leaked = sorted(n for n in os.listdir("/dev/shm") if n.startswith(cell.name))
    report = ProcessDemoReport(
        seconds=seconds,
        reads=reads,
        torn=torn,
        publishes=publishes,
        killed_pid=killed_pid,
        evicted=evicted,
        leaked=leaked,
    )
    print(
        f"done in {seconds:.1f} s: {reads:,} lookups by {processes} reader processes "
        f"({reads / seconds:,.0f}/s), {publishes:,} tables published, reader {killed_pid} killed "
        f"and evicted ({evicted} slot)",
        file=stream,
    )
    if report.ok:
        print("verified: no torn read, nothing leaked (/dev/shm holds nothing of the demo's)", file=stream)
    else:
        print(f"FAILED: {torn} torn reads, left in /dev/shm: {leaked}, evicted {evicted}", file=stream)
    return report


class _PlainView:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = 0.0

    def __enter__(self) -> _PlainView:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, line: str) -> None:
        now = time.monotonic()
        if now - self._last >= 0.95:
            print(line, file=self.stream, flush=True)
            self._last = now


class _RichView:
    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        self._live = Live(console=Console(file=stream), refresh_per_second=4, transient=False)

    def __enter__(self) -> _RichView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, line: str) -> None:
        from rich.text import Text

        self._live.update(Text(line.strip()))


def _make_view(stream: TextIO, live: bool | None) -> _PlainView | _RichView:
    if live is None:
        live = stream.isatty()
    if live:
        try:
            return _RichView(stream)
        except ImportError:
            print("(install qsbr[live] for the live view: pip install 'qsbr[live]')", file=stream)
    return _PlainView(stream)
