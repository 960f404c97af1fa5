"""When releases run, how often, and where (docs/api.md, "Retiring and
releasing" and "Where releases run")."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest

import qsbr
from conftest import STEP_TIMEOUT, Worker, wait_until


def test_release_waits_for_every_thread_attached_at_retire(domain: qsbr.Domain, make_worker: Any) -> None:
    r1, r2, writer = make_worker("r1"), make_worker("r2"), make_worker("writer")
    for w in (r1, r2, writer):
        w.call(domain.register)
    released: list[str] = []
    writer.call(domain.retire, "old", released.append)
    for _ in range(3):
        assert not domain.poll()
    r1.call(domain.quiescent)
    assert not domain.poll()
    r2.call(domain.detach)  # detach also ends what it held
    assert not domain.poll()  # the writer itself has not passed a quiescent state
    assert released == []
    writer.call(domain.quiescent)
    assert domain.poll()
    assert released == ["old"]
    for w in (r1, r2, writer):
        w.call(domain.unregister)


def test_thread_registered_after_retire_does_not_hold_it_back(domain: qsbr.Domain, make_worker: Any) -> None:
    writer = make_worker("writer")
    writer.call(domain.register)
    released: list[str] = []
    writer.call(domain.retire, "old", released.append)
    writer.call(domain.quiescent)
    domain.poll()  # advances to the goal
    writer.call(domain.quiescent)
    late = make_worker("late")
    late.call(domain.register)  # registers at the new wr_seq
    assert domain.poll()
    assert released == ["old"]
    late.call(domain.unregister)
    writer.call(domain.unregister)


def test_each_release_runs_exactly_once_even_with_concurrent_pollers(domain: qsbr.Domain) -> None:
    counts: dict[int, int] = {}
    lock = threading.Lock()

    def release(i: int) -> None:
        with lock:
            counts[i] = counts.get(i, 0) + 1

    domain.register()
    for i in range(2000):
        domain.retire(i, release)
    stop = threading.Event()

    def poller() -> None:
        while not stop.is_set():
            domain.poll()

    pollers = [threading.Thread(target=poller) for _ in range(3)]
    for t in pollers:
        t.start()
    try:
        domain.quiescent()
        assert domain.barrier(timeout=20)
    finally:
        stop.set()
        for t in pollers:
            t.join(timeout=STEP_TIMEOUT)
    assert not any(t.is_alive() for t in pollers)
    assert counts == {i: 1 for i in range(2000)}
    assert domain.pending == 0
    domain.unregister()


def test_release_runs_outside_internal_locks_and_may_retire(domain: qsbr.Domain) -> None:
    domain.register()
    order: list[str] = []

    def second(x: str) -> None:
        order.append(x)

    def first(x: str) -> None:
        order.append(x)
        # Everything here would deadlock if a domain lock were held.
        domain.retire("second", second)
        domain.poll()
        assert domain.pending >= 0
        domain.stats()

    domain.retire("first", first)
    assert domain.barrier(timeout=5)
    assert domain.barrier(timeout=5)
    assert order == ["first", "second"]
    domain.unregister()


def test_release_that_raises_is_reported_and_others_still_run(
    domain: qsbr.Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    released: list[str] = []
    bad = object()

    def boom(obj: object) -> None:
        raise ValueError("release failed")

    domain.register()
    domain.retire("a", released.append)
    domain.retire(bad, boom)
    domain.retire("b", released.append)
    assert domain.barrier(timeout=5)
    assert released == ["a", "b"]
    assert len(reports) == 1
    assert reports[0].object is bad
    assert isinstance(reports[0].exc_value, ValueError)
    assert reports[0].exc_type is ValueError
    assert "qsbr" in reports[0].err_msg
    assert domain.stats().release_errors == 1
    domain.unregister()


def test_default_unraisable_hook_accepts_the_report(
    domain: qsbr.Domain, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # CPython's own hook only takes its own struct type: the report must be one.
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)

    class Resource:
        def __repr__(self) -> str:
            return "<Resource 7>"

    def boom(obj: object) -> None:
        raise KeyError("gone")

    domain.register()
    domain.retire(Resource(), boom)
    assert domain.barrier(timeout=5)
    err = capsys.readouterr().err
    assert "<Resource 7>" in err and "KeyError" in err
    domain.unregister()


def test_on_release_error_callback() -> None:
    seen: list[tuple[BaseException, object]] = []
    d = qsbr.Domain(on_release_error=lambda exc, obj: seen.append((exc, obj)))
    d.register()

    def boom(obj: object) -> None:
        raise RuntimeError("x")

    d.retire("res", boom)
    assert d.barrier(timeout=5)
    assert [(type(e), o) for e, o in seen] == [(RuntimeError, "res")]
    d.unregister()


def test_defer_runs_callback_with_arguments(domain: qsbr.Domain) -> None:
    got: list[Any] = []
    domain.register()
    domain.defer(got.append, 1)
    domain.defer(lambda a, *, b: got.append((a, b)), 2, b=3)
    domain.defer(lambda: got.append("none"))
    assert domain.barrier(timeout=5)
    assert got == [1, (2, 3), "none"]
    domain.unregister()


@pytest.mark.parametrize("method", ["synchronize", "barrier"])
def test_waiting_from_inside_a_release_raises(domain: qsbr.Domain, method: str) -> None:
    errors: list[BaseException] = []

    def release(obj: object) -> None:
        try:
            getattr(domain, method)(timeout=1)
        except RuntimeError as exc:
            errors.append(exc)

    domain.register()
    domain.retire("x", release)
    assert domain.barrier(timeout=5)
    assert len(errors) == 1 and "release" in str(errors[0])
    domain.unregister()


def test_base_exception_in_release_loses_nothing(domain: qsbr.Domain) -> None:
    released: list[str] = []
    interrupted = []

    def interrupt(obj: object) -> None:
        if not interrupted:
            interrupted.append(obj)
            raise KeyboardInterrupt

    domain.register()
    domain.retire("a", released.append)
    domain.retire("b", interrupt)
    domain.retire("c", released.append)
    with pytest.raises(KeyboardInterrupt):
        domain.barrier(timeout=5)
    assert released == ["a"]
    # "b" was attempted once and raised; the items after it were not lost.
    assert domain.pending == 1
    assert domain.barrier(timeout=5)
    assert released == ["a", "c"]
    domain.unregister()


def test_synchronize_waits_for_attached_readers(domain: qsbr.Domain, worker: Worker) -> None:
    worker.call(domain.register)
    assert not domain.synchronize(timeout=0.05)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(domain.synchronize(timeout=STEP_TIMEOUT)))
    t.start()
    assert wait_until(lambda: domain.wr_seq > 3)  # the waiter has advanced
    worker.call(domain.quiescent)
    t.join(timeout=STEP_TIMEOUT)
    assert result == [True]
    worker.call(domain.detach)
    assert domain.synchronize(timeout=5)  # detached threads do not count
    worker.call(domain.unregister)


def test_registered_caller_counts_as_quiescent_while_waiting(domain: qsbr.Domain) -> None:
    domain.register()
    assert domain.synchronize(timeout=5)
    released: list[int] = []
    domain.retire(1, released.append)
    assert domain.barrier(timeout=5)
    assert released == [1]
    domain.detach()
    assert domain.synchronize(timeout=5)
    assert domain.is_registered()
    domain.unregister()


def test_barrier_times_out_while_a_reader_holds_on(domain: qsbr.Domain, worker: Worker) -> None:
    worker.call(domain.register)
    domain.register()
    released: list[int] = []
    domain.retire(1, released.append)
    assert not domain.barrier(timeout=0.05)
    assert released == [] and domain.pending == 1
    worker.call(domain.detach)
    assert domain.barrier(timeout=5)
    assert released == [1]
    worker.call(domain.unregister)
    domain.unregister()


def test_barrier_from_an_unregistered_thread(domain: qsbr.Domain, worker: Worker) -> None:
    worker.call(domain.register)
    released: list[int] = []
    worker.call(domain.retire, 1, released.append)
    worker.call(domain.detach)
    assert domain.barrier(timeout=5)
    assert released == [1]
    worker.call(domain.unregister)


# -- rule 8: the design's "not shared" fast path ------------------------------


def test_a_sole_attached_thread_keeps_what_it_retired_until_its_quiescent_state(domain: qsbr.Domain) -> None:
    # Nobody else can hold it, but the retiring thread itself may, until it
    # passes a quiescent state (it read the object earlier in the same
    # request, or reads a pool view it just gave back). The fast path used
    # to release it at this poll.
    domain.register()
    released: list[int] = []
    domain.retire(1, released.append)
    assert not domain.poll()
    assert released == []
    domain.quiescent()
    assert domain.poll()
    assert released == [1]
    domain.unregister()


def test_the_retire_that_advances_does_not_release_under_its_caller(domain: qsbr.Domain) -> None:
    d = qsbr.Domain(deferred_limit=2)
    released: list[str] = []
    with d.registered():
        d.retire("a", released.append)
        d.retire("b", released.append)  # the deferred_limit-th: advances and polls
        assert released == []
        d.quiescent()
        d.retire("c", released.append)
        d.retire("d", released.append)  # polls again: a and b are past their grace period
        assert released == ["a", "b"]
    d.close()


def test_not_shared_path_in_a_barrier_with_other_threads_detached(
    domain: qsbr.Domain, worker: Worker
) -> None:
    # A barrier's caller holds nothing across the call: its own list goes at once.
    worker.call(domain.register)
    worker.call(domain.detach)
    domain.register()
    released: list[int] = []
    domain.retire(1, released.append)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert released == [1]
    worker.call(domain.unregister)
    domain.unregister()


def test_not_shared_path_does_not_release_what_others_retired(domain: qsbr.Domain, worker: Worker) -> None:
    # The caller may still hold what *another* thread retired: in a barrier
    # its own list goes at once, theirs only after a grace period.
    domain.register()
    worker.call(domain.register)
    seen: list[tuple[str, bool]] = []

    def note(obj: str) -> None:
        seen.append((obj, domain.goal_reached(theirs_goal)))

    theirs_goal = worker.call(domain.retire, "theirs", note)
    worker.call(domain.detach)
    domain.retire("mine", note)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert seen == [("mine", False), ("theirs", True)]
    worker.call(domain.unregister)
    domain.unregister()


def test_not_shared_path_does_not_apply_with_another_attached_thread(
    domain: qsbr.Domain, worker: Worker
) -> None:
    domain.register()
    worker.call(domain.register)
    released: list[int] = []
    domain.retire(1, released.append)
    assert not domain.poll()
    assert released == []
    worker.call(domain.quiescent)
    domain.quiescent()
    assert domain.poll()
    assert released == [1]
    worker.call(domain.unregister)
    domain.unregister()


@pytest.mark.parametrize("poller", ["unregistered-barrier", "reclaimer"])
def test_release_may_retire_even_on_an_unregistered_polling_thread(poller: str, worker: Worker) -> None:
    """A release may retire (docs/api.md, "Where releases run") wherever it
    runs: on an unregistered thread that calls barrier(), or on the
    background reclaimer."""
    d = qsbr.Domain(background=(poller == "reclaimer"))
    order: list[str] = []

    def second(x: str) -> None:
        order.append(x)

    def first(x: str) -> None:
        order.append(x)
        d.retire("second", second)
        d.defer(order.append, "third")

    worker.call(d.register)
    worker.call(d.retire, "first", first)
    worker.call(d.detach)  # the worker holds nothing: everything may run
    assert not d.is_registered()  # this thread polls unregistered
    for _ in range(3):
        assert d.barrier(timeout=STEP_TIMEOUT)
    assert wait_until(lambda: len(order) == 3)
    assert order == ["first", "second", "third"]
    assert d.pending == 0 and d.stats().release_errors == 0
    worker.call(d.unregister)
    d.close()
