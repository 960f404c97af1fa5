"""After os.fork() the child keeps only the forking thread's state
(docs/api.md, "Fork")."""

from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Any

import pytest

import qsbr
from helpers import STEP_TIMEOUT, Worker

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _in_child(check: object) -> None:
    """Fork; run check() in the child; fail the test if the child fails."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() with threads running: that is the case under test.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            check()  # type: ignore[operator]
            code = 0
        except BaseException as exc:  # noqa: BLE001
            print(f"child failed: {exc!r}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the check in the forked child failed"


@pytest.mark.parametrize("on_fork", ["drop", "adopt"])
def test_child_keeps_only_the_forking_thread(scan: str, on_fork: str, worker: Worker) -> None:
    domain = qsbr.Domain(scan=scan, on_fork=on_fork)
    worker.call(domain.register)  # attached, never quiescent: would block everything
    domain.register()
    released: list[int] = []
    domain.retire(1, released.append)
    assert not domain.poll()

    def check() -> None:
        s = domain.stats()
        assert s.threads == 1 and s.attached == 1, s
        assert domain.is_registered()
        # The worker did not survive the fork: nothing waits on it.
        assert domain.barrier(timeout=5)
        if on_fork == "adopt":
            assert released == [1]  # the child ran the parent's release
        else:
            assert released == []  # forgotten: the parent's release is the parent's
            assert domain.stats().forgotten_at_fork == 1 and domain.pending == 0
        domain.retire(2, released.append)
        assert domain.barrier(timeout=5)
        assert released[-1] == 2
        # New threads work in the child.
        t = threading.Thread(target=lambda: domain.register() or domain.unregister())
        t.start()
        t.join(timeout=5)
        assert domain.stats().threads == 1

    _in_child(check)
    # The parent is untouched: the worker still holds the release back.
    assert domain.stats().threads == 2
    assert released == []
    worker.call(domain.unregister)
    assert domain.barrier(timeout=5)
    assert released == [1]
    domain.unregister()
    domain.close()


def test_a_child_does_not_run_a_release_the_parent_still_needs(tmp_path: Any) -> None:
    """../shared/repros/fork_child_runs_parent_releases.py: a release with an
    outside effect (it deletes a file). By default the child forgets the
    parent's backlog, so the parent's reader still finds its file."""
    d = qsbr.Domain()
    path = tmp_path / "snapshot-0"
    path.write_text("data")
    cell = qsbr.Cell(path, lambda p: p.unlink(), domain=d)
    reader = Worker("reader")
    try:
        reader.call(d.register)
        held = reader.call(lambda: cell.value)  # the parent's reader holds snapshot 0
        new = tmp_path / "snapshot-1"
        new.write_text("data")
        cell.set(new)  # snapshot 0 is pending: the reader holds it

        def check() -> None:
            assert d.barrier(timeout=2)  # a worker process that shuts down cleanly

        _in_child(check)
        assert held.read_text() == "data"  # still there: the child did not delete it
        reader.call(d.unregister)
        assert d.barrier(timeout=5)
        assert not path.exists()  # the parent released it, once its reader was done
    finally:
        reader.stop()
        d.close()


def test_on_fork_is_checked() -> None:
    with pytest.raises(ValueError, match='on_fork must be "drop" or "adopt"'):
        qsbr.Domain(on_fork="keep")


def test_child_of_unregistered_thread(domain: qsbr.Domain, worker: Worker) -> None:
    worker.call(domain.register)

    def check() -> None:
        assert domain.stats().threads == 0
        assert not domain.is_registered()
        with domain.registered():
            got: list[int] = []
            domain.retire(3, got.append)
            assert domain.barrier(timeout=STEP_TIMEOUT)
            assert got == [3]

    _in_child(check)
    worker.call(domain.unregister)


def test_structures_work_in_a_child_forked_while_another_thread_holds_their_locks() -> None:
    d = qsbr.Domain(stall_timeout=None)
    cell = qsbr.Cell(1, domain=d)
    pool = qsbr.BufferPool(domain=d)
    array = qsbr.SharedArray("q", pool=pool)
    held = threading.Event()
    done = threading.Event()

    def hold() -> None:
        with cell._lock, pool._lock, array._lock:
            held.set()
            done.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(10)

    def check() -> None:
        import signal

        signal.alarm(20)  # a lock still held would hang the child: fail it instead
        cell.set(2)
        assert cell.value == 2
        view = pool.acquire(100)
        pool.release(view)
        array.append(7)
        assert array[-1] == 7

    try:
        _in_child(check)
    finally:
        done.set()
        t.join(10)
