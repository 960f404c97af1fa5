"""ThreadPoolExecutor: workers attached only while they run a task
(docs/api.md, "qsbr.ThreadPoolExecutor"). Every test runs under both rd_seq
strategies."""

from __future__ import annotations

import threading

import pytest

import qsbr
from helpers import STEP_TIMEOUT, Resource, read, wait_until

#: Run every test here with the domain in debug mode too (conftest.py).
DEBUG_TOO = True


def test_executor_workers_are_attached_only_while_running(domain: qsbr.Domain) -> None:
    inside = threading.Event()
    go_on = threading.Event()
    seen: list[int] = []

    def init(x: int) -> None:
        seen.append(x)

    with qsbr.ThreadPoolExecutor(2, domain=domain, initializer=init, initargs=(7,)) as ex:
        assert ex.domain is domain
        assert list(ex.map(lambda x: x * 2, range(10))) == list(range(0, 20, 2))
        assert wait_until(lambda: domain.stats().threads >= 1)
        # Idle workers are detached. Waited for: a worker the pool started
        # for the map may still be between registering (attached) and the
        # detach its start-up ends with (a CI failure on 3.13t, 1 in many).
        assert wait_until(lambda: domain.stats().attached == 0)

        def task() -> bool:
            inside.set()
            return go_on.wait(STEP_TIMEOUT) and domain.is_registered()

        fut = ex.submit(task)
        assert inside.wait(STEP_TIMEOUT)
        # The running worker is attached. Waited for: submit() may start the
        # pool's second worker, attached until its start-up ends detached (a
        # CI failure on 3.13t: attached == 2 for that moment).
        assert wait_until(lambda: domain.stats().attached == 1)
        go_on.set()
        assert fut.result(timeout=STEP_TIMEOUT) is True
        with pytest.raises(ZeroDivisionError):
            ex.submit(lambda: 1 / 0).result(timeout=STEP_TIMEOUT)
        assert wait_until(lambda: domain.stats().attached == 0)
    assert seen and set(seen) == {7}
    assert wait_until(lambda: domain.stats().threads == 0)  # workers left when they ended


def test_executor_tasks_hold_a_swapped_value_until_they_finish(domain: qsbr.Domain) -> None:
    cell = qsbr.Cell(Resource(1), Resource.release, domain=domain)
    loaded = threading.Event()
    finish = threading.Event()

    def task() -> int:
        r = cell.value
        loaded.set()
        finish.wait(STEP_TIMEOUT)
        return r.use()  # still open: the task has not reached its quiescent state

    with qsbr.ThreadPoolExecutor(1, domain=domain) as ex:
        fut = ex.submit(task)
        assert loaded.wait(STEP_TIMEOUT)
        old = read(domain, lambda: cell.value)
        cell.set(Resource(2))
        assert not domain.poll() and not old.released
        finish.set()
        assert fut.result(timeout=STEP_TIMEOUT) == 1
        assert domain.barrier(timeout=STEP_TIMEOUT)
        assert old.releases == 1
    with pytest.raises(TypeError):
        qsbr.ThreadPoolExecutor(1, domain=object())  # type: ignore[arg-type]
