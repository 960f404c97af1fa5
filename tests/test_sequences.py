"""The sequence numbers and the deferred advance, as the design says
(docs/api.md, "Sequence numbers")."""

from __future__ import annotations

import pytest

import qsbr
from conftest import Worker


def test_wr_seq_starts_at_one_and_advances_by_two(domain: qsbr.Domain) -> None:
    assert domain.wr_seq == 1
    assert domain.rd_seq == 1
    seen = [domain.advance() for _ in range(5)]
    assert seen == [3, 5, 7, 9, 11]
    assert domain.wr_seq == 11
    assert all(v % 2 == 1 for v in seen)


def test_wr_seq_and_rd_seq_are_read_only(domain: qsbr.Domain) -> None:
    with pytest.raises(AttributeError):
        domain.wr_seq = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        domain.rd_seq = 5  # type: ignore[misc]


def test_register_copies_wr_seq_and_quiescent_copies_it_again(domain: qsbr.Domain) -> None:
    domain.advance()
    domain.register()
    try:
        # The only attached thread is at seq 3: rd_seq is its seq.
        domain.advance()  # 5
        domain.poll()
        assert domain.rd_seq == 3
        domain.quiescent()
        domain.poll()
        assert domain.rd_seq == 5
    finally:
        domain.unregister()


def test_rd_seq_is_min_over_attached_threads(domain: qsbr.Domain, make_worker: object) -> None:
    a, b = make_worker("a"), make_worker("b")  # type: ignore[operator]
    a.call(domain.register)  # seq 1
    domain.advance()  # 3
    b.call(domain.register)  # seq 3
    domain.advance()  # 5
    domain.poll()
    assert domain.rd_seq == 1
    a.call(domain.quiescent)  # a: 5
    domain.poll()
    assert domain.rd_seq == 3  # b holds it
    b.call(domain.quiescent)
    domain.poll()
    assert domain.rd_seq == 5
    a.call(domain.unregister)
    b.call(domain.unregister)


def test_detached_threads_are_left_out(domain: qsbr.Domain, worker: Worker) -> None:
    worker.call(domain.register)
    domain.advance()
    domain.poll()
    assert domain.rd_seq == 1
    worker.call(domain.detach)
    domain.poll()
    assert domain.rd_seq == domain.wr_seq == 3
    # quiescent() while detached does not re-attach the thread
    worker.call(domain.quiescent)
    domain.advance()
    domain.poll()
    assert domain.rd_seq == 5
    worker.call(domain.attach)  # seq = 5
    domain.advance()
    domain.poll()
    assert domain.rd_seq == 5
    worker.call(domain.unregister)


def test_no_threads_means_rd_seq_is_wr_seq(domain: qsbr.Domain) -> None:
    domain.advance()
    domain.advance()
    domain.poll()
    assert domain.rd_seq == domain.wr_seq == 5


def test_rd_seq_never_decreases(domain: qsbr.Domain, worker: Worker) -> None:
    domain.advance()
    domain.advance()
    domain.poll()
    assert domain.rd_seq == 5
    # A thread that registers now copies wr_seq = 5; rd_seq cannot go lower.
    worker.call(domain.register)
    domain.advance()
    domain.poll()
    assert domain.rd_seq == 5
    history = []
    for _ in range(20):
        domain.advance()
        if len(history) % 3 == 0:
            worker.call(domain.quiescent)
        domain.poll()
        history.append(domain.rd_seq)
    assert history == sorted(history)
    worker.call(domain.unregister)


def test_goal_tagging_and_goal_reached(domain: qsbr.Domain, worker: Worker) -> None:
    domain.register()
    worker.call(domain.register)
    released: list[object] = []
    goal = domain.retire("r", released.append)
    assert goal == domain.wr_seq + 2  # deferred: not advanced yet
    assert not domain.goal_reached(goal)
    assert not domain.poll(goal)  # advances to the goal, but the worker is behind
    assert domain.wr_seq == goal
    domain.quiescent()
    worker.call(domain.quiescent)
    assert not domain.goal_reached(goal)  # goal_reached does not scan
    assert domain.poll(goal)
    assert domain.goal_reached(goal)
    assert released == ["r"]
    worker.call(domain.unregister)
    domain.unregister()


def test_deferred_advance_every_tenth_call_advances(domain: qsbr.Domain) -> None:
    domain.register()
    try:
        start = domain.wr_seq
        for _ in range(9):
            assert domain.deferred_advance() == start + 2
            assert domain.wr_seq == start
        assert domain.deferred_advance() == start + 2
        assert domain.wr_seq == start + 2
        # The count starts again.
        for _ in range(9):
            assert domain.deferred_advance() == start + 4
        assert domain.wr_seq == start + 2
        assert domain.deferred_advance() == start + 4
        assert domain.wr_seq == start + 4
    finally:
        domain.unregister()


def test_deferred_advance_is_counted_per_thread(domain: qsbr.Domain, worker: Worker) -> None:
    domain.register()
    worker.call(domain.register)
    for _ in range(9):
        domain.deferred_advance()
    for _ in range(9):
        worker.call(domain.deferred_advance)
    assert domain.wr_seq == 1  # 18 calls, but each thread is at 9
    worker.call(domain.deferred_advance)
    assert domain.wr_seq == 3
    domain.deferred_advance()
    assert domain.wr_seq == 5
    worker.call(domain.unregister)
    domain.unregister()


def test_deferred_advance_without_registering(domain: qsbr.Domain) -> None:
    for _ in range(9):
        assert domain.deferred_advance() == 3
    assert domain.deferred_advance() == 3
    assert domain.wr_seq == 3


@pytest.mark.parametrize("limit", [1, 3, 10])
def test_deferred_limit_is_honoured(limit: int, scan: str) -> None:
    d = qsbr.Domain(deferred_limit=limit, scan=scan)
    d.register()
    for i in range(1, 3 * limit + 1):
        d.deferred_advance()
        assert d.wr_seq == 1 + 2 * (i // limit)
    d.unregister()


def test_retire_uses_deferred_advance(domain: qsbr.Domain) -> None:
    domain.register()
    sink: list[int] = []
    goals = [domain.retire(i, sink.append) for i in range(10)]
    assert goals[:9] == [3] * 9
    assert goals[9] == 3 and domain.wr_seq == 3
    domain.unregister()


def test_pending_items_are_not_stuck_behind_an_unadvanced_goal(domain: qsbr.Domain, worker: Worker) -> None:
    # One retirement: its goal is wr_seq + 2 and nobody else will advance.
    worker.call(domain.register)
    released: list[str] = []
    worker.call(domain.retire, "x", released.append)
    assert domain.wr_seq == 1
    worker.call(domain.quiescent)  # copies 1: not enough on its own
    assert not domain.poll()  # poll advances to 3 ...
    assert domain.wr_seq == 3
    worker.call(domain.quiescent)  # ... so this quiescent state can reach it
    assert domain.poll()
    assert released == ["x"]
    worker.call(domain.unregister)


def test_synchronize_and_barrier_advance_themselves(domain: qsbr.Domain) -> None:
    domain.register()
    released: list[str] = []
    domain.retire("x", released.append)
    assert domain.barrier(timeout=5)
    assert released == ["x"]
    w = domain.wr_seq
    assert domain.synchronize(timeout=5)
    assert domain.wr_seq > w
    domain.unregister()
