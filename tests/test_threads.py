"""Thread exit, churn, and concurrent use of every method (docs/api.md,
"Threads" and "Thread safety")."""

from __future__ import annotations

import gc
import threading
from typing import Any

import qsbr
from helpers import STEP_TIMEOUT, run_threads, wait_until


def test_thread_that_exits_registered_is_unregistered(domain: qsbr.Domain) -> None:
    run_threads(domain.register)
    # The thread's locals are cleared as it ends; allow the interpreter a
    # moment to finish tearing the thread down after join() returns.
    assert wait_until(lambda: domain.stats().threads == 0)
    domain.advance()
    domain.poll()
    assert domain.rd_seq == domain.wr_seq


def test_exited_thread_never_holds_reclamation_back_and_backlog_is_adopted(
    domain: qsbr.Domain,
) -> None:
    released: list[int] = []
    reader_ready = threading.Event()
    reader_go = threading.Event()

    def reader() -> None:
        domain.register()
        reader_ready.set()
        reader_go.wait(STEP_TIMEOUT)
        # exits without unregistering or quiescing

    def writer() -> None:
        domain.register()
        for i in range(25):
            domain.retire(i, released.append)
        # exits with its retirements still pending (gh-130794's case)

    t = threading.Thread(target=reader)
    t.start()
    assert reader_ready.wait(STEP_TIMEOUT)
    run_threads(writer)
    assert domain.pending > 0
    assert not domain.poll()  # the reader still holds them
    reader_go.set()
    t.join(timeout=STEP_TIMEOUT)
    assert wait_until(lambda: domain.stats().threads == 0)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert sorted(released) == list(range(25))


def test_unregister_keeps_backlog_pending_until_safe(domain: qsbr.Domain, worker: Any) -> None:
    worker.call(domain.register)
    domain.register()
    released: list[int] = []
    domain.retire(1, released.append)
    domain.unregister()
    assert domain.pending == 1
    assert not domain.poll()  # never released early: the worker has not quiesced
    assert released == []
    worker.call(domain.quiescent)
    domain.poll()
    worker.call(domain.quiescent)
    assert domain.poll()
    assert released == [1]
    worker.call(domain.unregister)


def test_thread_churn_leaves_no_state_behind(domain: qsbr.Domain) -> None:
    released: list[int] = []

    def short_lived(i: int) -> None:
        with domain.registered():
            domain.retire(i, released.append)
            domain.quiescent()

    def exits_registered(i: int) -> None:
        domain.register()
        domain.retire(i, released.append)

    for round_ in range(10):
        run_threads(
            *((lambda i=round_ * 20 + i: (short_lived if i % 2 else exits_registered)(i)) for i in range(20))
        )
    gc.collect()
    assert wait_until(lambda: domain.stats().threads == 0)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert sorted(released) == list(range(200))


def test_registered_context_manager(domain: qsbr.Domain) -> None:
    assert not domain.is_registered()
    with domain.registered() as d:
        assert d is domain and domain.is_registered()
    assert not domain.is_registered()


def test_detached_context_manager_restores_attachment(domain: qsbr.Domain) -> None:
    domain.register()
    domain.advance()
    with domain.detached():
        domain.poll()
        assert domain.stats().attached == 0
    assert domain.stats().attached == 1
    domain.detach()
    with domain.detached():
        pass
    assert domain.stats().attached == 0  # it was detached before: stays so
    domain.unregister()


def test_default_domain_is_one_per_process() -> None:
    assert qsbr.default_domain() is qsbr.default_domain()
    got: list[qsbr.Domain] = []
    run_threads(lambda: got.append(qsbr.default_domain()))
    assert got == [qsbr.default_domain()]


def test_every_method_concurrently(domain: qsbr.Domain) -> None:
    """All public methods at once from several threads, on either build
    (docs/api.md, "Thread safety")."""
    released: list[int] = []
    rel_lock = threading.Lock()
    stop = threading.Event()
    per_thread = 300
    n_workers = 4

    def release(i: int) -> None:
        with rel_lock:
            released.append(i)

    def worker(k: int) -> None:
        with domain.registered():
            for i in range(per_thread):
                n = k * per_thread + i
                domain.retire(n, release)
                domain.quiescent()
                if i % 7 == 0:
                    with domain.detached():
                        domain.poll()
                if i % 11 == 0:
                    domain.deferred_advance()
                    domain.goal_reached(domain.wr_seq)
                if i % 50 == 0:
                    # Every other worker quiesces or waits (counted as
                    # quiescent): a grace period always ends.
                    assert domain.synchronize(timeout=STEP_TIMEOUT), "synchronize() timed out"
                if i % 97 == 0:
                    domain.stats()
                    _ = domain.pending, domain.rd_seq
            assert domain.barrier(timeout=STEP_TIMEOUT), "barrier() timed out"

    def workers_then_stop() -> None:
        try:
            run_threads(*(lambda k=k: worker(k) for k in range(n_workers)), timeout=60)
        finally:
            stop.set()

    def churner() -> None:
        while not stop.is_set():
            domain.register()
            domain.quiescent()
            domain.unregister()
            domain.advance()

    run_threads(churner, workers_then_stop, timeout=90)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert sorted(released) == list(range(n_workers * per_thread))
    s = domain.stats()
    assert s.releases == n_workers * per_thread and s.pending == 0
    assert s.wr_seq % 2 == 1 and s.rd_seq <= s.wr_seq
