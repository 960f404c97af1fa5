"""Cell: one shared value, lock-free reads, the old value retired on a write
(docs/api.md, "qsbr.Cell"). Every test runs under both rd_seq strategies."""

from __future__ import annotations

import threading

import pytest

import qsbr
from helpers import STEP_TIMEOUT, Resource, Worker, read, run_threads

#: Run every test here with the domain in debug mode too (conftest.py).
DEBUG_TOO = True


def test_cell_reads_and_retires_after_readers(domain: qsbr.Domain, worker: Worker) -> None:
    first, second = Resource(1), Resource(2)
    cell = qsbr.Cell(first, Resource.release, domain=domain)
    assert read(domain, lambda: cell.value) is first and read(domain, cell.get) is first
    assert cell.domain is domain
    worker.call(domain.register)
    held = worker.call(lambda: cell.value)  # the reader holds `first`
    cell.set(second)  # from an unregistered thread
    assert read(domain, lambda: cell.value) is second
    assert not domain.poll() and not first.released
    assert held.use() == 1
    worker.call(domain.quiescent)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert first.releases == 1 and not second.released
    worker.call(domain.unregister)


def test_cell_set_same_value_retires_nothing(domain: qsbr.Domain) -> None:
    r = Resource(1)
    cell = qsbr.Cell(r, Resource.release, domain=domain)
    cell.set(r)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert not r.released


def test_cell_exchange_and_compare_and_set(domain: qsbr.Domain) -> None:
    a, b, c = Resource(1), Resource(2), Resource(3)
    cell = qsbr.Cell(a, Resource.release, domain=domain)
    assert cell.exchange(b) is a  # handed back, not retired
    assert not cell.compare_and_set(a, c)  # identity: a is no longer there
    assert read(domain, lambda: cell.value) is b
    assert cell.compare_and_set(b, c)
    assert read(domain, lambda: cell.value) is c
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert (a.releases, b.releases, c.releases) == (0, 1, 0)


def test_cell_tells_the_domain_what_a_release_frees(domain: qsbr.Domain, worker: Worker) -> None:
    worker.call(domain.register)  # holds releases back
    cell = qsbr.Cell(Resource(1), Resource.release, domain=domain, size=lambda r: 1000 * r.version)
    cell.set(Resource(2))
    cell.set(Resource(3))
    assert domain.pending_bytes == 1000 + 2000
    worker.call(domain.unregister)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert domain.pending_bytes == 0
    with pytest.raises(TypeError, match="size must be callable"):
        qsbr.Cell(1, size=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("registered", [False, True], ids=["unregistered-writer", "registered-writer"])
def test_cell_checks_what_its_size_callable_returns(domain: qsbr.Domain, registered: bool) -> None:
    """The same check as retire(size=), whichever thread writes: a size()
    that returns a non-int or a negative number is refused before anything
    changes (the old value stays published: it is neither lost nor queued)."""
    old = Resource(1)
    sizes: list[object] = [2.5]
    cell = qsbr.Cell(old, Resource.release, domain=domain, size=lambda r: sizes[0])  # type: ignore[arg-type,return-value]
    if registered:
        domain.register()
    try:
        with pytest.raises(TypeError, match="size must be an int >= 0"):
            cell.set(Resource(2))
        sizes[0] = -1
        with pytest.raises(ValueError, match="size must be >= 0"):
            cell.set(Resource(3))
        with pytest.raises(ValueError, match="size must be >= 0"):
            cell.compare_and_set(old, Resource(5))
        assert read(domain, lambda: cell.value) is old
        assert domain.pending == 0 and domain.pending_bytes == 0
        sizes[0] = 64
        cell.set(Resource(4))  # a good size: retired as usual
        assert domain.barrier(timeout=STEP_TIMEOUT)
        assert domain.stats().released_bytes >= 64
    finally:
        if registered:
            domain.unregister()


def test_cell_misuse(domain: qsbr.Domain) -> None:
    cell = qsbr.Cell(1, domain=domain)
    with pytest.raises(AttributeError, match="use cell.set"):
        cell.value = 2  # type: ignore[misc]
    with pytest.raises(TypeError, match="release must be callable"):
        qsbr.Cell(1, 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="domain must be a qsbr.Domain"):
        qsbr.Cell(1, domain="d")  # type: ignore[arg-type]
    typed = qsbr.Cell[int](5, domain=domain)
    assert read(domain, lambda: typed.value) == 5


def test_cell_close(domain: qsbr.Domain) -> None:
    r = Resource(1)
    cell = qsbr.Cell(r, Resource.release, domain=domain)
    cell.close()
    cell.close()
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert r.releases == 1
    for op in (cell.get, lambda: cell.set(Resource(2)), lambda: cell.exchange(3)):
        with pytest.raises(ValueError, match="closed"):
            op()
    assert "closed" in repr(cell)


def test_cell_under_concurrent_readers_and_writers(domain: qsbr.Domain) -> None:
    made = [Resource(0)]
    cell = qsbr.Cell(made[0], Resource.release, domain=domain)
    stop = threading.Event()
    made_lock = threading.Lock()

    def reader() -> None:
        with domain.registered():
            n = 0
            while not stop.is_set():
                r = cell.value
                r.use()
                r.use()
                n += 1
                if n % 8 == 0:
                    domain.quiescent()

    def writer(base: int, registered: bool) -> None:
        if registered:
            domain.register()
        for k in range(300):
            r = Resource(base + k)
            with made_lock:
                made.append(r)
            cell.set(r)
            if registered:
                domain.quiescent()
        if registered:
            domain.unregister()

    def writers_then_stop() -> None:
        try:
            run_threads(lambda: writer(1000, True), lambda: writer(2000, False), timeout=60)
        finally:
            stop.set()

    run_threads(reader, reader, reader, writers_then_stop, timeout=90)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    current = read(domain, lambda: cell.value)
    assert [r.releases for r in made if r is not current] == [1] * (len(made) - 1)
    assert not current.released
