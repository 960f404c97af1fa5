"""ThreadHandle: the cheap, per-thread form of quiescent()."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import qsbr
from conftest import STEP_TIMEOUT, Worker


def test_register_returns_the_threads_handle(domain: qsbr.Domain) -> None:
    h = domain.register()
    assert isinstance(h, qsbr.ThreadHandle)
    assert domain.handle() is h and h.domain is domain
    domain.advance()
    st = domain._tls.state
    assert st.seq != domain.wr_seq
    h.quiescent()
    assert st.seq == domain.wr_seq  # the same store as domain.quiescent()
    domain.unregister()


def test_handle_quiescent_ends_a_grace_period_like_domain_quiescent(
    domain: qsbr.Domain, worker: Worker
) -> None:
    h = worker.call(domain.register)
    released: list[str] = []
    with domain.registered():
        domain.retire("old", released.append)
        assert not domain.poll()
        assert released == []
        worker.call(h.quiescent)  # the reader's own thread uses its handle
        domain.quiescent()
        assert domain.poll()
    assert released == ["old"]
    worker.call(domain.unregister)


def test_handle_follows_detach_and_attach(domain: qsbr.Domain) -> None:
    h = domain.register()
    st = domain._tls.state
    domain.detach()
    domain.advance()
    h.quiescent()  # detached: does nothing, the thread stays detached
    assert st.seq == 0
    domain.attach()
    domain.advance()
    h.quiescent()
    assert st.seq == domain.wr_seq
    with domain.detached():
        h.quiescent()
        assert st.seq == 0
    assert st.seq == domain.wr_seq
    domain.unregister()


def test_handle_of_a_thread_that_left_raises(domain: qsbr.Domain) -> None:
    h = domain.register()
    domain.unregister()
    with pytest.raises(qsbr.NotRegisteredError, match="no longer registered"):
        h.quiescent()
    with pytest.raises(qsbr.NotRegisteredError):
        domain.handle()
    h2 = domain.register()
    assert h2 is not h
    h2.quiescent()
    domain.unregister()


def test_handle_of_a_thread_that_exited_raises(domain: qsbr.Domain) -> None:
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(domain.register()))
    t.start()
    t.join(STEP_TIMEOUT)
    assert got and domain.stats().threads == 0  # unregistered when it ended
    with pytest.raises(qsbr.NotRegisteredError):
        got[0].quiescent()
