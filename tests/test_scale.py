"""The registry and the incremental rd_seq scan (docs/design.md, "Limitations").

Timing claims live in benchmarks/bench_scale.py; these tests check the
behaviour that makes them possible, and that safety does not depend on the
strategy."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import qsbr
from helpers import STEP_TIMEOUT, Deadline, ParkedReaders, Worker, wait_until
from qsbr.scan import IncrementalScan


def with_step(step: int) -> tuple[qsbr.Domain, IncrementalScan]:
    """A domain whose incremental scan examines ``step`` slots per poll."""
    made: list[IncrementalScan] = []

    def make(registry: Any) -> IncrementalScan:
        made.append(IncrementalScan(registry, step=step))
        return made[-1]

    d = qsbr.Domain(scan="incremental")
    d._set_scanner(make)
    return d, made[0]


@pytest.fixture
def small_steps() -> Iterator[tuple[qsbr.Domain, IncrementalScan]]:
    d, scanner = with_step(4)
    yield d, scanner
    d.close()


def test_scan_strategy_is_selectable() -> None:
    assert qsbr.Domain().scan == "incremental"
    assert qsbr.Domain(scan="flat").scan == "flat"
    with pytest.raises(ValueError, match='scan must be "incremental" or "flat"'):
        qsbr.Domain(scan="tree")


def test_pass_spread_across_polls_waits_for_every_thread(
    small_steps: tuple[qsbr.Domain, IncrementalScan],
) -> None:
    d, _ = small_steps
    readers = ParkedReaders(d, 30)  # 30 slots, 4 per poll
    try:
        d.register()
        released: list[int] = []
        d.retire(1, released.append)
        d.quiescent()
        for _ in range(40):  # 40 polls: several whole passes
            d.poll()
        assert released == []  # nobody quiesced after the retirement
        # A pass needs every reader to quiesce after it began: drive rounds.
        deadline = Deadline()
        while not released and deadline:
            readers.start_round()
            d.quiescent()
            d.poll()
            time.sleep(0.002)  # let the readers run
        assert released == [1]
        d.unregister()
    finally:
        readers.close()


def test_poll_behind_an_unmoved_laggard_does_no_scan(
    small_steps: tuple[qsbr.Domain, IncrementalScan],
) -> None:
    d, scanner = small_steps
    readers = ParkedReaders(d, 20)
    try:
        d.advance()
        for _ in range(10):  # complete a pass: the readers hold rd_seq at 1
            d.poll()
        scans = d.stats().scans
        for _ in range(100):
            assert not d.poll(d.wr_seq)
        # No new pass was started: the laggard has not moved.
        assert d.stats().scans == scans
        assert scanner.in_pass is False  # 20 readers, 4 a poll: a started pass would still run
        readers.start_round()
        # Once it moves, passes resume and rd_seq catches up.
        deadline = Deadline()
        while not d.poll(d.wr_seq) and deadline:
            readers.start_round()
            time.sleep(0.002)
        assert d.goal_reached(d.wr_seq)
        assert d.stats().scans > scans
    finally:
        readers.close()


def test_thread_arriving_behind_the_cursor_cannot_lose_its_resource() -> None:
    """A thread registers into a slot the pass already examined, with an old
    wr_seq, and loads the resource; every thread the pass examines later moves
    past the resource's goal. The pass result is capped at the wr_seq it read
    when it began, so the resource is not released under the late thread."""
    d, scanner = with_step(1)
    early, reader, writer, late = Worker("early"), Worker("reader"), Worker("writer"), Worker("late")
    try:
        early.call(d.register)  # slot 0
        reader.call(d.register)  # slot 1
        writer.call(d.register)  # slot 2
        early.call(d.unregister)  # slot 0 free
        d.poll()  # the pass starts at wr_seq 1 and examines slot 0 (empty)
        assert scanner.in_pass and scanner.cursor == 1
        box = ["R"]
        late.call(d.register)  # reuses slot 0, behind the cursor, seq = 1
        held = late.call(lambda: box[0])  # and loads the resource
        released: list[str] = []

        def swap_and_retire() -> None:
            old, box[0] = box[0], "R2"
            d.retire(old, released.append)
            d.advance()  # wr_seq reaches the goal
            d.quiescent()

        writer.call(swap_and_retire)
        reader.call(d.quiescent)
        d.poll()  # examines slot 1 (reader, past the goal)
        d.poll()  # slot 2 (writer, past the goal): the pass completes
        assert not scanner.in_pass
        assert d.rd_seq == 1  # capped at the wr_seq the pass began with
        assert released == [] and held == "R"
        for w in (late, reader, writer):
            w.call(d.quiescent)
        for _ in range(20):
            d.poll()
        assert released == ["R"]
        for w in (late, reader, writer):
            w.call(d.unregister)
    finally:
        for w in (early, reader, writer, late):
            w.stop()
        d.close()


@pytest.mark.timeout(300)
def test_ten_thousand_threads_come_and_go_without_leaking(domain: qsbr.Domain) -> None:
    refs: list[weakref.ref[Any]] = []
    released: list[int] = []
    lock = threading.Lock()
    total, concurrent = 10_000, 50

    def life(i: int) -> None:
        domain.register()
        with lock:
            refs.append(weakref.ref(domain._tls.state))
        if i % 10 == 0:
            domain.retire(i, released.append)
        domain.quiescent()
        if i % 2:
            domain.unregister()
        # else: exits registered; the thread-exit sentinel unregisters it

    for start in range(0, total, concurrent):
        batch = [threading.Thread(target=life, args=(i,)) for i in range(start, start + concurrent)]
        for t in batch:
            t.start()
        for t in batch:
            t.join(timeout=STEP_TIMEOUT)
    gc.collect()
    assert len(refs) == total
    # Threads that exited registered are unregistered as they are torn down.
    assert wait_until(lambda: domain.stats().threads == 0), domain.stats().threads
    # Slots were reused: capacity is bounded by the threads alive at once
    # (plus stragglers still tearing down), not by the 10,000 that came.
    assert domain._registry.capacity <= 4 * concurrent
    gc.collect()
    assert sum(1 for r in refs if r() is not None) == 0, "thread states leaked"
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert sorted(released) == list(range(0, total, 10))


def test_advance_and_a_failing_poll_leave_nothing_for_the_collector(domain: qsbr.Domain) -> None:
    """A reader that never quiesces: every poll fails, every advance is
    timed for stall reports. Neither may leave objects the garbage collector
    tracks behind: on free-threaded 3.13 each collection walks the whole
    heap, and with thousands of threads that is the poll's p99
    (benchmarks/bench_scale.py measures it with the collector on)."""
    reader = Worker("reader")
    try:
        reader.call(domain.register)
        domain.register()
        for _ in range(50):  # warm up: a first pass, the type caches
            domain.poll(domain.advance())
        gc.collect()
        gc.disable()
        try:
            before = len(gc.get_objects())
            for _ in range(2000):
                assert not domain.poll(domain.advance())
            grown = len(gc.get_objects()) - before
        finally:
            gc.enable()
        assert grown < 20, f"2,000 advances and failing polls left {grown} tracked objects behind"
        domain.unregister()
        reader.call(domain.unregister)
    finally:
        reader.stop()
