"""Bounded, observable reclamation: sizes, byte triggers, the hard cap,
stall detection and the counters behind them."""

from __future__ import annotations

import array
import logging
import sys
import threading
import time
from typing import Any

import pytest

import qsbr
from helpers import STEP_TIMEOUT, Deadline, Worker, wait_until

MiB = 1 << 20


class Blob:
    """A 1 MiB resource that knows whether it was freed, and how often."""

    def __init__(self, k: int, nbytes: int = MiB) -> None:
        self.k = k
        self.data: bytearray | None = bytearray(nbytes)
        self.frees = 0

    def free(self) -> None:
        self.frees += 1
        self.data = None


# -- sizes and pending_bytes --------------------------------------------------


def test_size_estimates() -> None:
    assert qsbr.estimate_size(bytearray(1000)) >= 1000
    assert qsbr.estimate_size(memoryview(bytearray(5000))[:3000]) == 3000
    assert qsbr.estimate_size(array.array("d", range(100))) >= 800
    assert qsbr.estimate_size(object()) == sys.getsizeof(object())


def test_a_type_of_one_size_is_sized_once_and_others_every_time() -> None:
    """sizes.py: where sys.getsizeof cannot differ between instances, the
    cache holds the size itself; a variable size is measured every time."""
    from qsbr.sizes import SIZERS

    class Plain:
        pass

    class OwnSize:
        def __init__(self, n: int) -> None:
            self.n = n

        def __sizeof__(self) -> int:
            return self.n

    assert qsbr.estimate_size(Plain()) == sys.getsizeof(Plain())
    assert SIZERS[Plain] == sys.getsizeof(Plain())
    assert (qsbr.estimate_size(OwnSize(100)), qsbr.estimate_size(OwnSize(200))) == (
        sys.getsizeof(OwnSize(100)),
        sys.getsizeof(OwnSize(200)),
    )
    assert callable(SIZERS[OwnSize])
    assert qsbr.estimate_size(b"x" * 10) != qsbr.estimate_size(b"x" * 1000)  # items: not fixed
    assert qsbr.estimate_size(type("T", (), {})) == sys.getsizeof(type("T", (), {}))
    assert not isinstance(SIZERS.get(type), int)


def test_pending_bytes_follow_retire_and_release(domain: qsbr.Domain, worker: Worker) -> None:
    domain.register()
    worker.call(domain.register)  # an attached reader holds everything back
    domain.retire("a", lambda _: None, size=1000)
    domain.retire(bytearray(5000), lambda _: None)
    assert domain.pending == 2
    assert 6000 <= domain.pending_bytes < 6200
    domain.defer(lambda: None)  # a plain callback frees nothing we can count
    assert 6000 <= domain.pending_bytes < 6200
    domain.detach()
    assert not domain.poll()  # advances to the goal; the reader still holds it
    worker.call(domain.quiescent)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    s = domain.stats()
    assert (s.pending, s.pending_bytes) == (0, 0)
    assert s.released_bytes == s.peak_pending_bytes >= 6000
    worker.call(domain.unregister)
    domain.unregister()


def test_bad_size_is_refused(domain: qsbr.Domain) -> None:
    with domain.registered():
        with pytest.raises(ValueError, match="size must be >= 0"):
            domain.retire(object(), lambda _: None, size=-1)
        for bad in (1.5, "10", True, None.__class__):
            with pytest.raises(TypeError, match="size must be an int >= 0"):
                domain.retire(object(), lambda _: None, size=bad)  # type: ignore[arg-type]
        assert domain.pending == 0


def test_adopted_backlog_keeps_its_bytes_exactly(domain: qsbr.Domain, make_worker: Any) -> None:
    reader, writer = make_worker("reader"), make_worker("writer")
    reader.call(domain.register)
    writer.call(domain.register)
    writer.call(lambda: domain.retire("x", lambda _: None, size=4096))
    writer.call(domain.unregister)  # the domain adopts the backlog, bytes and all
    assert (domain.pending, domain.pending_bytes) == (1, 4096)
    assert not domain.poll()
    reader.call(domain.quiescent)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert (domain.pending, domain.pending_bytes) == (0, 0)
    reader.call(domain.unregister)


# -- byte triggers --------------------------------------------------------------


def test_byte_budget_advances_before_the_item_count() -> None:
    d = qsbr.Domain(deferred_limit=100, deferred_bytes=1000)
    with d.registered():
        w = d.wr_seq
        d.retire("a", lambda _: None, size=600)
        assert d.wr_seq == w  # under the budget: deferred
        d.retire("b", lambda _: None, size=600)  # 1200 > 1000: advance and process
        assert d.wr_seq == w + 2
        assert d.pending == 2  # the poll it made cannot release them under their own retirer
        d.quiescent()
        assert d.poll() and d.pending == 0
        d.retire("c", lambda _: None, size=10)
        assert d.wr_seq == w + 2  # the budget starts over after an advance


def test_one_block_over_the_budget_is_processed_at_once(worker: Worker) -> None:
    d = qsbr.Domain(deferred_limit=100)  # default budget: 1 MiB
    freed: list[int] = []
    with d.registered():
        worker.call(d.register)
        w = d.wr_seq
        d.retire(bytearray(2 * MiB), lambda b: freed.append(len(b)))  # size estimated
        assert d.wr_seq == w + 2  # advanced at once, not after 100 retirements
        assert freed == []  # the reader has not quiesced
        worker.call(d.quiescent)
        d.quiescent()
        d.retire(Blob(1), lambda b: freed.append(b.k), size=2 * MiB)  # polls again
        assert freed == [2 * MiB]
        worker.call(d.unregister)
    d.close()


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="deferred_bytes must be >= 1"):
        qsbr.Domain(deferred_bytes=0)
    with pytest.raises(ValueError, match="max_pending_bytes must be >= 1"):
        qsbr.Domain(max_pending_bytes=0)
    with pytest.raises(TypeError, match="max_pending must be an int"):
        qsbr.Domain(max_pending=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='on_full must be "block" or "raise"'):
        qsbr.Domain(on_full="drop")
    with pytest.raises(ValueError, match="stall_timeout must be > 0"):
        qsbr.Domain(stall_timeout=0)
    with pytest.raises(TypeError, match="on_stall must be callable"):
        qsbr.Domain(on_stall=42)  # type: ignore[arg-type]


# -- the hard cap -------------------------------------------------------------------


class Sampler:
    """Samples pending_bytes / pending from another thread while a test runs."""

    def __init__(self, domain: qsbr.Domain) -> None:
        self.domain = domain
        self.max_bytes = 0
        self.max_items = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_bytes = max(self.max_bytes, self.domain.pending_bytes)
            self.max_items = max(self.max_items, self.domain.pending)
            time.sleep(0.0005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=STEP_TIMEOUT)


@pytest.mark.parametrize("scan", ["incremental", "flat"])
def test_block_mode_writer_waits_under_the_cap(scan: str, make_worker: Any) -> None:
    cap = 4 * MiB
    d = qsbr.Domain(scan=scan, max_pending_bytes=cap, on_full="block", stall_timeout=None)
    reader, writer = make_worker("stuck-reader"), make_worker("writer")
    reader.call(d.register)  # attached, never quiescent
    blobs = [Blob(k) for k in range(20)]
    sampler = Sampler(d)
    done = threading.Event()

    def flood() -> None:
        with d.registered():
            for b in blobs:
                d.retire(b, Blob.free, size=MiB)
        done.set()

    writer.thread_flood = threading.Thread(target=flood, name="flood", daemon=True)  # type: ignore[attr-defined]
    writer.thread_flood.start()  # type: ignore[attr-defined]
    # The writer fills the cap and then waits: it cannot finish.
    assert wait_until(lambda: d.stats().full_waits >= 1)
    time.sleep(0.1)
    assert not done.is_set()
    assert d.pending_bytes <= cap
    assert sum(b.frees for b in blobs) == 0  # nothing released under the reader
    reader.call(d.quiescent)  # the reader moves on: the writer proceeds
    # Each quiescent state frees what was retired before it; keep quiescing.
    assert wait_until(lambda: (reader.call(d.quiescent), done.is_set())[1])
    writer.thread_flood.join(timeout=STEP_TIMEOUT)  # type: ignore[attr-defined]
    reader.call(d.detach)
    assert d.barrier(timeout=STEP_TIMEOUT)
    sampler.stop()
    assert sampler.max_bytes <= cap
    s = d.stats()
    assert s.peak_pending_bytes <= cap
    assert s.pending == 0 and s.pending_bytes == 0
    assert [b.frees for b in blobs] == [1] * 20  # nothing lost, nothing twice
    reader.call(d.unregister)
    d.close()


def test_raise_mode_names_the_holder_and_loses_nothing(make_worker: Any) -> None:
    d = qsbr.Domain(max_pending_bytes=3 * MiB, on_full="raise", stall_timeout=None)
    reader = make_worker("stuck-reader")
    reader.call(d.register)
    ident = reader.call(threading.get_ident)
    blobs = [Blob(k) for k in range(6)]
    queued: list[Blob] = []
    errors: list[qsbr.PendingLimitError] = []
    with d.registered():
        for b in blobs:
            try:
                d.retire(b, Blob.free, size=MiB)
                queued.append(b)
            except qsbr.PendingLimitError as exc:
                errors.append(exc)
        assert len(queued) == 3 and len(errors) == 3
        assert d.pending_bytes == 3 * MiB
        exc = errors[0]
        assert exc.max_pending_bytes == 3 * MiB and exc.pending_bytes == 3 * MiB and exc.size == MiB
        # The reader, and this thread too: it has not quiesced either.
        holders = {h.thread_ident: h for h in exc.holders}
        assert set(holders) == {ident, threading.get_ident()}
        assert holders[ident].thread_name == "stuck-reader"
        assert holders[ident].grace_periods_behind >= 1
        assert "stuck-reader" in str(exc) and "still yours" in str(exc)
        assert sum(b.frees for b in blobs) == 0
        # The caller still owns what was refused; once the reader quiesces
        # there is room again.
        d.quiescent()
        reader.call(d.quiescent)
        for b in blobs[3:]:
            d.poll()
            d.quiescent()
            reader.call(d.quiescent)
            d.retire(b, Blob.free, size=MiB)
        reader.call(d.detach)
        assert d.barrier(timeout=STEP_TIMEOUT)
    assert [b.frees for b in blobs] == [1] * 6
    assert d.stats().limit_errors == 3
    reader.call(d.unregister)
    d.close()


def test_item_cap(make_worker: Any) -> None:
    d = qsbr.Domain(max_pending=5, on_full="raise", stall_timeout=None)
    reader = make_worker("reader")
    reader.call(d.register)
    with d.registered():
        for k in range(5):
            d.retire(k, lambda _: None)
        with pytest.raises(qsbr.PendingLimitError, match="5 of max_pending=5"):
            d.retire(5, lambda _: None)
        assert d.pending == 5
    reader.call(d.detach)
    assert d.barrier(timeout=STEP_TIMEOUT)
    reader.call(d.unregister)
    d.close()


def test_block_larger_than_the_cap(make_worker: Any) -> None:
    """No backlog can hold it: block mode waits a grace period and releases
    it in retire(); raise mode refuses it."""
    reader = make_worker("reader")
    d = qsbr.Domain(max_pending_bytes=MiB, stall_timeout=None)
    reader.call(d.register)
    big = Blob(0, 2 * MiB)
    frees_when_reader_quiesced: list[int] = []

    def reader_quiesces_later() -> None:
        time.sleep(0.2)
        frees_when_reader_quiesced.append(big.frees)  # before its quiescent state
        reader.call(d.quiescent)

    with d.registered():
        t = threading.Thread(target=reader_quiesces_later, daemon=True)
        t.start()
        d.retire(big, Blob.free, size=2 * MiB)  # returns once the reader has quiesced
        # retire() waited: when the reader was about to quiesce (0.2 s in),
        # the blob was still unreleased, and retire() has released it since.
        assert frees_when_reader_quiesced == [0]
        assert big.frees == 1
        assert d.pending_bytes == 0
        t.join(timeout=STEP_TIMEOUT)
        assert not t.is_alive()
    reader.call(d.unregister)
    d.close()
    d2 = qsbr.Domain(max_pending_bytes=MiB, on_full="raise", stall_timeout=None)
    with d2.registered(), pytest.raises(qsbr.PendingLimitError, match="exceed the cap"):
        d2.retire(bytearray(2 * MiB), len)
    d2.close()


def test_release_that_retires_is_admitted_over_the_cap() -> None:
    d = qsbr.Domain(max_pending=1, on_full="block", stall_timeout=None)
    done: list[str] = []

    def release_and_chain(x: str) -> None:
        done.append(x)
        if x == "first":
            d.retire("second", done.append)  # would wait on its own batch

    with d.registered():
        d.retire("first", release_and_chain)
        assert d.barrier(timeout=STEP_TIMEOUT)
        assert d.barrier(timeout=STEP_TIMEOUT)
    assert done == ["first", "second"]
    d.close()


# -- stall detection ----------------------------------------------------------------


class StallLog:
    def __init__(self) -> None:
        self.reports: list[qsbr.StallReport] = []
        self.lock = threading.Lock()

    def __call__(self, report: qsbr.StallReport) -> None:
        with self.lock:
            self.reports.append(report)


def test_stall_is_reported_naming_the_thread_and_repeats_with_backoff(
    make_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="qsbr")
    log = StallLog()
    d = qsbr.Domain(stall_timeout=0.2, on_stall=log, watchdog=True)
    stuck, fine = make_worker("stuck-reader"), make_worker("fine-reader")
    stuck.call(d.register)
    fine.call(d.register)
    stuck_ident = stuck.call(threading.get_ident)
    with d.registered():
        d.retire("x", lambda _: None)
        d.poll()
        d.detach()  # this thread holds nothing: only the stuck reader is late
        # The watchdog notices without anyone polling again.
        assert wait_until(lambda: (fine.call(d.quiescent), len(log.reports) >= 1)[1])
        rep = log.reports[0]
        assert (rep.thread_name, rep.thread_ident) == ("stuck-reader", stuck_ident)
        assert (rep.name, rep.ident) == (rep.thread_name, rep.thread_ident)
        assert rep.stalled_for >= 0.2 and rep.report == 1
        assert rep.grace_periods_behind >= 1
        assert (rep.pending, rep.pending_bytes) == (1, sys.getsizeof("x"))
        assert "_serve" in rep.stack  # the worker's loop, where it sits
        # While it lasts the stall is reported again, backing off: the
        # second report at twice the timeout, the third at four times.
        assert wait_until(lambda: len(log.reports) >= 2)
        second = log.reports[1]
        assert second.report == 2 and second.stalled_for >= 0.4 and second.thread_ident == stuck_ident
        time.sleep(0.1)
        assert len(log.reports) == 2  # the third is not due before 0.8 s
        assert wait_until(lambda: len(log.reports) >= 3)
        assert log.reports[2].report == 3 and log.reports[2].stalled_for >= 0.8
        records = [r for r in caplog.records if r.name == "qsbr"]
        assert len(records) == len(log.reports) and records[0].levelno == logging.WARNING
        assert "stuck-reader" in records[0].getMessage()
        assert str(stuck_ident) in records[0].getMessage()
        assert "report 2" in records[1].getMessage()
        assert [r.thread_ident for r in d.stalled()] == [stuck_ident]
        assert d.stats().stalls == 1  # one stall, however many reports
        # Quiescing ends the stall; a new one is reported again, as new.
        stuck.call(d.quiescent)
        assert d.poll()
        assert d.stalled() == []
        d.attach()
        d.retire("y", lambda _: None)
        d.poll()
        d.detach()
        n = len(log.reports)
        assert wait_until(lambda: (fine.call(d.quiescent), len(log.reports) > n)[1])
        assert log.reports[n].thread_ident == stuck_ident and log.reports[n].report == 1
        assert d.stats().stalls == 2
        stuck.call(d.unregister)
        fine.call(d.unregister)
        assert d.barrier(timeout=STEP_TIMEOUT)
    d.close()


def test_no_thread_is_started_unless_asked(make_worker: Any) -> None:
    """A single-threaded program stays single-threaded: no watchdog by
    default (3.13t warns at every fork of a multi-threaded process)."""
    before = {t.ident for t in threading.enumerate()}
    d = qsbr.Domain(stall_timeout=0.05)
    with d.registered():
        for k in range(50):
            d.retire(k, lambda _: None)
        assert d.barrier(timeout=STEP_TIMEOUT)
    assert {t.ident for t in threading.enumerate()} == before
    d.close()
    d2 = qsbr.Domain(stall_timeout=0.05, watchdog=True)
    with d2.registered():
        d2.retire(1, lambda _: None)
        assert any(t.name == "qsbr-watchdog" for t in threading.enumerate())
    d2.close()
    assert wait_until(lambda: not any(t.name == "qsbr-watchdog" for t in threading.enumerate()))


def test_stall_is_reported_from_the_writers_own_polls(make_worker: Any) -> None:
    """Without a watchdog, the retire() calls that poll run the checks."""
    log = StallLog()
    d = qsbr.Domain(stall_timeout=0.1, on_stall=log, deferred_limit=1)
    stuck = make_worker("stuck-reader")
    stuck.call(d.register)
    with d.registered():
        deadline = Deadline()
        while not log.reports and deadline:
            d.retire(object(), lambda _: None)  # every retire advances and polls
            d.quiescent()
            time.sleep(0.01)
    assert log.reports and log.reports[0].thread_name == "stuck-reader"
    stuck.call(d.unregister)
    assert d.barrier(timeout=STEP_TIMEOUT)
    d.close()


def test_stall_is_reported_while_synchronize_and_barrier_wait(make_worker: Any) -> None:
    log = StallLog()
    d = qsbr.Domain(stall_timeout=0.1, on_stall=log)
    stuck = make_worker("stuck-reader")
    stuck.call(d.register)
    with d.registered():
        d.retire("x", lambda _: None)
        assert not d.barrier(timeout=0.5)  # the stuck reader holds it
    assert log.reports and {r.thread_name for r in log.reports} == {"stuck-reader"}
    n = len(log.reports)
    assert not d.synchronize(timeout=1.0)  # the stall goes on: its next report comes while we wait
    assert len(log.reports) > n
    stuck.call(d.unregister)
    assert d.barrier(timeout=STEP_TIMEOUT)
    d.close()


def test_a_growing_backlog_is_reported_long_before_the_timeout(make_worker: Any) -> None:
    """The reader that forgets to quiesce (../shared/repros/forgot_quiescent_memory.py):
    with stall_bytes the warning comes once the backlog it holds passes the
    threshold, not stall_timeout later; the reports carry the backlog."""
    log = StallLog()
    d = qsbr.Domain(stall_timeout=30.0, stall_bytes=1 << 20, on_stall=log)
    stuck = make_worker("request-worker-7")
    stuck.call(d.register)
    t0 = time.monotonic()
    with d.registered():
        deadline = Deadline()
        while not log.reports and deadline:
            d.retire(bytearray(64 << 10), lambda _: None)  # 64 KiB each
            d.quiescent()
            time.sleep(0.002)
    took = time.monotonic() - t0
    assert log.reports, "no stall report for a growing backlog"
    rep = log.reports[0]
    assert rep.thread_name == "request-worker-7" and rep.pending_bytes >= 1 << 20
    assert took < 5.0  # the timeout is 30 s: the bytes made the report
    stuck.call(d.unregister)
    assert d.barrier(timeout=STEP_TIMEOUT)
    d.close()
    with pytest.raises(ValueError, match="stall_bytes must be >= 1"):
        qsbr.Domain(stall_bytes=0)


def test_detached_threads_are_never_stalled(make_worker: Any) -> None:
    log = StallLog()
    d = qsbr.Domain(stall_timeout=0.1, on_stall=log)
    sleeper = make_worker("sleeper")
    sleeper.call(d.register)
    sleeper.call(d.detach)  # blocked in I/O, correctly detached
    with d.registered():
        d.retire("x", lambda _: None)
        d.detach()
        time.sleep(0.5)
        assert d.stalled() == []
        assert d.barrier(timeout=STEP_TIMEOUT)
    assert log.reports == []
    sleeper.call(d.unregister)
    d.close()


def test_idle_attached_thread_is_not_stalled_while_nothing_waits(make_worker: Any) -> None:
    log = StallLog()
    d = qsbr.Domain(stall_timeout=0.1, on_stall=log)
    idle = make_worker("idle")
    idle.call(d.register)
    with d.registered():
        d.advance()
        time.sleep(0.3)
        assert d.stalled() == []  # nothing is pending: nobody waits on it
    assert log.reports == []
    idle.call(d.unregister)
    d.close()


def test_stall_detection_off(make_worker: Any) -> None:
    d = qsbr.Domain(stall_timeout=None)
    stuck = make_worker("stuck")
    stuck.call(d.register)
    with d.registered():
        d.retire("x", lambda _: None)
        d.advance()
        time.sleep(0.05)
        assert d.stalled() == []
    stuck.call(d.unregister)
    assert d.barrier(timeout=STEP_TIMEOUT)
    d.close()


def test_on_stall_error_is_reported_not_raised(make_worker: Any) -> None:
    def bad(report: qsbr.StallReport) -> None:
        raise ValueError("callback bug")

    d = qsbr.Domain(stall_timeout=0.05, on_stall=bad)
    stuck = make_worker("stuck")
    stuck.call(d.register)
    seen: list[Any] = []
    old = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with d.registered():
            d.retire("x", lambda _: None)
            d.poll()
            d.detach()
            time.sleep(0.1)
            assert len(d.stalled()) == 1
            assert wait_until(lambda: len(seen) >= 1)
    finally:
        sys.unraisablehook = old
    assert isinstance(seen[0].exc_value, ValueError)
    stuck.call(d.unregister)
    assert d.barrier(timeout=STEP_TIMEOUT)
    d.close()


# -- counters --------------------------------------------------------------------


def test_counters_move_as_specified(make_worker: Any) -> None:
    d = qsbr.Domain(stall_timeout=None)
    reader, parked = make_worker("reader"), make_worker("parked")
    reader.call(d.register)
    parked.call(d.register)
    parked.call(d.detach)
    s0 = d.stats()
    assert (s0.threads, s0.attached, s0.detached) == (2, 1, 1)
    with d.registered():
        d.retire("a", lambda _: None, size=100)
        assert not d.poll()
        s1 = d.stats()
        assert s1.polls == s0.polls + 1 and s1.failed_polls == s0.failed_polls + 1
        assert s1.advances > s0.advances  # poll advanced to the pending goal
        assert (s1.pending, s1.pending_bytes) == (1, 100)
        assert s1.current_grace_period > 0
        time.sleep(0.05)
        reader.call(d.quiescent)
        d.quiescent()
        assert d.poll()
        s2 = d.stats()
        assert s2.grace_periods > s1.grace_periods
        assert s2.scans > s1.scans
        assert s2.releases == s1.releases + 1 and s2.released_bytes == 100
        assert s2.longest_grace_period >= 0.05
        assert s2.current_grace_period == 0.0
        assert (s2.pending, s2.pending_bytes, s2.peak_pending_bytes) == (0, 0, 100)
        d.retire("b", lambda _: (_ for _ in ()).throw(ValueError("boom")), size=5)
    old = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        reader.call(d.detach)
        assert d.barrier(timeout=STEP_TIMEOUT)
    finally:
        sys.unraisablehook = old
    assert d.stats().release_errors == 1
    reader.call(d.unregister)
    parked.call(d.unregister)
    d.close()


def test_an_interrupt_while_retire_waits_at_the_cap_queues_nothing(
    make_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (KeyboardInterrupt) in a retire() that waits at the cap: the
    call raises, nothing is queued or reserved, the caller still owns the
    object (docs/api.md, on_full)."""
    d = qsbr.Domain(max_pending=1, stall_timeout=None)
    reader = make_worker("reader")
    reader.call(d.register)  # holds the first release back: the cap is full
    calls = {"n": 0}
    admission = d._admission
    assert admission is not None
    real_wait = admission._wait_for_space

    def interrupted(timeout: float) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_wait(timeout)

    monkeypatch.setattr(admission, "_wait_for_space", interrupted)
    released: list[str] = []
    with d.registered():
        d.retire("first", released.append)
        with pytest.raises(KeyboardInterrupt):
            d.retire("second", released.append)
        assert d.pending == 1 and admission.reserved_items == 1  # "second" is still ours
        assert d.is_attached()  # and the thread is as it was before the call
    reader.call(d.unregister)
    assert d.barrier(timeout=STEP_TIMEOUT)
    assert released == ["first"]
    with d.registered():
        d.retire("second", released.append)  # retried: the cap has room again
    assert d.barrier(timeout=STEP_TIMEOUT)
    assert released == ["first", "second"]
    d.close()
