"""Read sections, ``with domain.attached():`` (docs/api.md, "Threads";
section.py), and the reusable context managers around them."""

from __future__ import annotations

import threading

import pytest

import qsbr
from helpers import STEP_TIMEOUT, Resource, Worker, run_threads, wait_until


def test_a_section_registers_attaches_and_leaves_the_thread_detached(domain: qsbr.Domain) -> None:
    assert not domain.is_registered()
    with domain.attached() as section:
        assert domain.is_registered() and domain.is_attached()
        assert section.depth == 1
        assert domain.stats().attached == 1
    assert domain.is_registered() and not domain.is_attached()  # holds nobody back now
    assert domain.stats().detached == 1
    domain.unregister()


def test_a_section_protects_what_it_reads_until_its_end(domain: qsbr.Domain, worker: Worker) -> None:
    old = Resource(1)
    cell = qsbr.Cell(old, Resource.release, domain=domain)
    inside = threading.Event()
    go_on = threading.Event()
    seen: list[int] = []

    def request() -> None:  # a thread-per-request handler, never registered by hand
        with domain.attached():
            r = cell.value
            inside.set()
            assert go_on.wait(STEP_TIMEOUT)
            seen.append(r.use())  # still valid: the section has not ended

    t = threading.Thread(target=request)
    t.start()
    assert inside.wait(STEP_TIMEOUT)
    cell.set(Resource(2))  # an unregistered writer
    assert not domain.poll() and not old.released  # the section holds it
    go_on.set()
    t.join(STEP_TIMEOUT)
    assert seen == [1]
    assert domain.barrier(timeout=STEP_TIMEOUT)  # the section's end was a quiescent state
    assert old.releases == 1


def test_the_end_of_the_outermost_section_is_a_quiescent_state(domain: qsbr.Domain) -> None:
    """From attached: the thread stays attached, and its seq moves."""
    domain.register()
    domain.advance()
    st_seq = domain.stats().rd_seq
    with domain.attached():
        with domain.attached() as inner:
            assert inner.depth == 2
            domain.advance()
        # the inner exit reported nothing: rd_seq cannot move past us yet
        domain.poll()
        assert domain.rd_seq == st_seq
    assert domain.is_attached()  # restored: it was attached
    domain.poll()
    assert domain.rd_seq == domain.wr_seq  # the outermost exit was a quiescent state
    domain.unregister()


def test_sections_nest_with_detached_blocks(domain: qsbr.Domain) -> None:
    with domain.attached():
        assert domain.is_attached()
        with domain.detached():
            assert not domain.is_attached()
            with domain.attached():  # inside a detached block: attached again
                assert domain.is_attached()
            assert not domain.is_attached()  # and back to what it was
        assert domain.is_attached()
        domain.detach()  # detaching inside a section by hand...
    assert not domain.is_attached()  # ...ends as the section found the thread
    with domain.attached():
        domain.detach()
        domain.attach()
    assert not domain.is_attached()
    domain.unregister()


def test_a_section_entered_attached_restores_attached_after_a_detach_inside(domain: qsbr.Domain) -> None:
    domain.register()
    with domain.attached():
        domain.detach()
    assert domain.is_attached()
    domain.unregister()


def test_sections_on_many_threads_hold_back_exactly_their_readers(domain: qsbr.Domain) -> None:
    made = [Resource(0)]
    cell = qsbr.Cell(made[0], Resource.release, domain=domain)
    stop = threading.Event()
    lock = threading.Lock()

    def handler() -> None:
        while not stop.is_set():
            with domain.attached():
                r = cell.value
                r.use()
                r.use()

    def writer() -> None:
        try:
            for k in range(1, 300):
                r = Resource(k)
                with lock:
                    made.append(r)
                cell.set(r)
        finally:
            stop.set()

    run_threads(handler, handler, handler, writer, timeout=60)
    assert domain.barrier(timeout=STEP_TIMEOUT)
    assert [r.releases for r in made[:-1]] == [1] * (len(made) - 1)
    assert wait_until(lambda: domain.stats().threads == 0)  # handler threads left when they ended


def test_the_handle_has_the_same_operations(domain: qsbr.Domain) -> None:
    h = domain.register()
    h.detach()
    assert not domain.is_attached()
    h.attach()
    assert domain.is_attached()
    with h.detached():
        assert not domain.is_attached()
    with h.attached():
        assert domain.is_attached()
    assert domain.is_attached()
    domain.unregister()
    for op in (h.attach, h.detach, h.attached, h.detached):
        with pytest.raises(qsbr.NotRegisteredError):
            op()


def test_registered_and_detached_are_plain_context_managers(domain: qsbr.Domain) -> None:
    with domain.registered() as d:
        assert d is domain and domain.is_registered()
    assert not domain.is_registered()
    with pytest.raises(qsbr.NotRegisteredError, match="detached"):
        domain.detached()
