"""SharedDomain: the per-thread API counted across processes, dead
participants evicted (SIGKILL, zombies, pid reuse), the table of pending
unlinks, fork, and bad input. Processes are fresh interpreters
(processes.Child); every wait is bounded."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from processes import ChildError, shm_names

import qsbr
from qsbr import shared_domain as sd
from qsbr import shm

native = pytest.mark.skipif(
    qsbr.implementation != "native",
    reason="SharedDomain needs the native kernel (tested: the error it raises)",
)


@pytest.fixture
def make_domain() -> Iterator[Callable[..., qsbr.SharedDomain]]:
    made: list[qsbr.SharedDomain] = []

    def make(**kwargs: object) -> qsbr.SharedDomain:
        d = qsbr.SharedDomain(create=True, **kwargs)  # type: ignore[arg-type]
        made.append(d)
        return d

    yield make
    for d in made:
        try:
            d.close(timeout=5)
        except TimeoutError:
            pass
        d._unlink_all_pending()
        d.unlink()
        assert not shm_names(d.name)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.mark.skipif(qsbr.implementation == "native", reason="the pure kernel's refusal")
def test_pure_kernel_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="native kernel.*QSBR_PURE_PYTHON|native kernel.*compiler"):
        qsbr.SharedDomain(create=True)
    with pytest.raises(RuntimeError, match="native kernel"):
        qsbr.SharedCell(create=True)


# -- bad input --------------------------------------------------------------------


@native
def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="capacity"):
        qsbr.SharedDomain(create=True, capacity=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="capacity"):
        qsbr.SharedDomain(create=True, capacity=True)
    with pytest.raises(ValueError, match="capacity"):
        qsbr.SharedDomain(create=True, capacity=0)
    with pytest.raises(ValueError, match="name is required"):
        qsbr.SharedDomain()
    with pytest.raises(TypeError, match="name must be a str"):
        qsbr.SharedDomain(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a valid shared-memory name"):
        qsbr.SharedDomain("a/b")
    with pytest.raises(FileNotFoundError):
        qsbr.SharedDomain(shm.new_name("qsbr_test_missing_"))
    with pytest.raises(TypeError, match="create"):
        qsbr.SharedDomain(create=1)  # type: ignore[arg-type]


@native
def test_a_foreign_segment_or_another_layout_is_refused() -> None:
    name = shm.new_name("qsbr_test_foreign_")
    mm = shm.create(name, 4096)
    try:
        mm[:16] = b"not a qsbr thing"
        with pytest.raises(ValueError, match="not a qsbr SharedDomain"):
            qsbr.SharedDomain(name)
        with pytest.raises(ValueError, match="not a qsbr SharedCell"):
            qsbr.SharedCell(name)
    finally:
        mm.close()
        shm.unlink(name)
    d = qsbr.SharedDomain(create=True, capacity=2)
    try:
        d._words.store(sd.H_VERSION, 99)
        with pytest.raises(ValueError, match="layout version 99"):
            qsbr.SharedDomain(d.name)
    finally:
        d._words.store(sd.H_VERSION, sd.LAYOUT_VERSION)
        d.close()
        d.unlink()


@native
def test_capacity_counts_threads_of_every_process(make_domain, children) -> None:
    d = make_domain(capacity=2)
    assert d.capacity == 2 and qsbr.SharedDomain(d.name).capacity == 2
    d.register()
    child = children()
    child.run(f"d = qsbr.SharedDomain({d.name!r}, capacity=99); d.register(); out = d.capacity")
    errors: list[BaseException] = []

    def register_one_more() -> None:
        try:
            d.register()
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=register_one_more)
    t.start()
    t.join(10)
    assert len(errors) == 1 and "capacity" in str(errors[0]) and "larger capacity" in str(errors[0])
    # A slot freed by unregister() is reused.
    child.run("d.unregister()")
    t = threading.Thread(target=register_one_more)
    t.start()
    t.join(10)
    assert len(errors) == 1


@native
def test_per_thread_errors(make_domain) -> None:
    d = make_domain()
    with pytest.raises(qsbr.NotRegisteredError):
        d.quiescent()
    with pytest.raises(qsbr.NotRegisteredError):
        d.unregister()
    h = d.register()
    with pytest.raises(RuntimeError, match="already registered"):
        d.register()
    d.unregister()
    with pytest.raises(RuntimeError, match="register\\(\\) again"):
        h.quiescent()
    with pytest.raises(TypeError, match="callable"):
        d.retire(object(), "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        d.retire(object(), print, size=-1)
    with pytest.raises(TypeError, match="retire_shared_memory|name must be a str"):
        d.retire_shared_memory(5)  # type: ignore[arg-type]


@native
def test_closed_domain_refuses_work(make_domain) -> None:
    d = make_domain()
    h = d.register()
    d.close()
    assert d.closed
    with pytest.raises(RuntimeError):
        h.quiescent()
    for call in (d.register, d.poll, d.advance, d.barrier, lambda: d.retire(1, print)):
        with pytest.raises(ValueError, match="closed"):
            call()
    d.close()  # twice is fine


# -- the protocol in one process -----------------------------------------------------


@native
def test_an_attached_reader_holds_releases_back_until_quiescent(make_domain) -> None:
    d = make_domain()
    assert d.wr_seq == 1 and d.rd_seq == 1
    h = d.register()
    released: list[str] = []
    goal = d.retire("a", released.append, size=10)
    assert not d.poll(goal) and released == [] and d.pending == 1
    assert d.stats().pending_bytes == 10
    h.quiescent()
    assert d.poll(goal) and released == ["a"] and d.goal_reached(goal)
    d.detach()  # a detached reader holds nothing back
    goal = d.defer(released.append, "b")
    assert d.poll(goal) and released == ["a", "b"]
    assert not d.is_attached()
    with d.detached():
        pass
    d.attach()
    assert d.is_attached()
    s = d.stats()
    assert (s.retired, s.releases, s.pending, s.threads, s.attached, s.processes) == (2, 2, 0, 1, 1, 1)
    assert s.released_bytes == 10 and s.evicted == 0 and s.as_dict()["evicted"] == 0


@native
def test_synchronize_and_barrier_wait_for_a_reader_thread(make_domain) -> None:
    d = make_domain()
    d.register()
    stop = threading.Event()
    entered = threading.Event()

    def reader() -> None:
        with d.registered() as h:
            entered.set()
            stop.wait(10)
            h.quiescent()
            time.sleep(0.5)

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert entered.wait(10)
        released: list[int] = []
        d.retire(1, released.append)
        assert not d.synchronize(timeout=0.05)
        assert not d.barrier(timeout=0.05) and released == []
        stop.set()
        assert d.barrier(timeout=10) and released == [1]
        assert d.synchronize(timeout=10)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


@native
def test_a_thread_that_ends_registered_frees_its_slot(make_domain) -> None:
    d = make_domain(capacity=1)
    t = threading.Thread(target=d.register)
    t.start()
    t.join(10)
    wait_for(lambda: d.stats().threads == 0)
    d.register()


# -- processes ------------------------------------------------------------------------------


@native
def test_a_reader_in_another_process_holds_releases_back(make_domain, children) -> None:
    d = make_domain()
    d.register()
    child = children()
    child.run(f"d = qsbr.SharedDomain({d.name!r}); h = d.register()")
    released: list[str] = []
    goal = d.retire("x", released.append)
    d.quiescent()
    assert not d.poll(goal) and released == []
    assert d.stats().processes == 2 and sorted(d.processes()) == sorted([os.getpid(), child.pid])
    child.run("h.quiescent()")
    d.quiescent()
    assert d.poll(goal) and released == ["x"]
    child.run("d.detach()")
    goal = d.retire("y", released.append)
    # A detached reader in another process holds nothing back.
    assert d.synchronize(timeout=10) and d.poll(goal) and released == ["x", "y"]
    child.run("d.close()")
    assert d.stats().processes == 1


@native
def test_a_killed_reader_is_evicted_even_as_an_unreaped_zombie(make_domain, children, caplog) -> None:
    d = make_domain()
    d.register()
    child = children()
    child.run(f"d = qsbr.SharedDomain({d.name!r}); h = d.register()")
    released: list[str] = []
    goal = d.retire("x", released.append)
    d.quiescent()
    assert not d.poll(goal)
    child.kill()  # SIGKILL; not reaped: os.kill(pid, 0) still succeeds
    wait_for(lambda: open(f"/proc/{child.pid}/stat").read().split(")")[1].split()[0] == "Z")
    os.kill(child.pid, 0)
    with caplog.at_level(logging.WARNING, logger="qsbr"):
        wait_for(lambda: (d.quiescent(), d.poll(goal))[1])
    assert released == ["x"]
    warnings = [r for r in caplog.records if r.name == "qsbr" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(child.pid) in warnings[0].getMessage()
    s = d.stats()
    assert s.evicted == 1 and s.processes == 1 and s.threads == 1
    child.wait()


@native
def test_pid_reuse_cannot_keep_a_dead_slot_alive(make_domain, caplog) -> None:
    """A dead participant's entry names a pid that a live process now has (faked:
    our own pid, and our parent's). Liveness is its lock, not its pid: evicted."""
    d = make_domain(capacity=4)
    d.register()
    w = d._words
    for entry, pid in ((2, os.getpid()), (3, os.getppid())):
        w.store(d._proc_word(entry, sd.P_PID), pid)
        w.store(d._proc_word(entry, sd.P_STATE), sd.LIVE)
        slot = d._slots_at + entry * sd.SLOT_WORDS
        w.store(slot + sd.S_OWNER, entry + 1)
        w.store(slot + sd.S_SEQ, 1)  # attached, far behind
    goal = d.advance()
    d.quiescent()
    with caplog.at_level(logging.WARNING, logger="qsbr"):
        assert d.poll(goal)
    assert d.stats().evicted == 2 and d.stats().threads == 1
    assert sum("evicted" in r.getMessage() for r in caplog.records) == 2


@native
def test_a_live_process_is_never_evicted(make_domain, children) -> None:
    """Another SharedDomain object of a live process, whose pid we even lie
    about: its lock is held, so its slot keeps holding rd_seq back."""
    d = make_domain()
    child = children()
    child.run(f"d = qsbr.SharedDomain({d.name!r}); h = d.register()")
    entry = next(e for e in range(d.capacity) if d._words.load(d._proc_word(e, sd.P_STATE)) == sd.LIVE)
    d._words.store(d._proc_word(entry, sd.P_PID), 999_999_999)  # a pid nobody has
    goal = d.advance()
    for _ in range(20):
        assert not d.poll(goal)
    assert d.stats().evicted == 0
    child.run("h.quiescent()")
    assert d.poll(goal)


@native
def test_unlinks_of_a_dead_process_are_performed_by_a_survivor(make_domain, children) -> None:
    d = make_domain()
    d.register()  # attached: holds the unlink back
    victim = shm.new_name("qsbr_test_victim_")
    shm.create(victim, 64).close()
    child = children()
    goal = child.run(f"d = qsbr.SharedDomain({d.name!r}); out = d.retire_shared_memory({victim!r})")
    child.send("os._exit(0)")  # it dies before the goal is reached
    child.wait()
    assert shm.exists(victim) and d.stats().pending_unlinks == 1
    assert not d.poll(goal)  # this thread has not been quiescent yet
    d.quiescent()
    assert d.poll(goal) or d.poll(goal)
    assert not shm.exists(victim) and d.stats().pending_unlinks == 0


@native
def test_barrier_waits_for_the_table_of_pending_unlinks(make_domain) -> None:
    d = make_domain()
    victim = shm.new_name("qsbr_test_victim_")
    shm.create(victim, 64).close()
    d.retire_shared_memory(victim)
    assert shm.exists(victim)
    assert d.barrier(timeout=10)
    assert not shm.exists(victim)


@native
def test_close_frees_slots_and_runs_what_it_retired(make_domain, children) -> None:
    d = make_domain()
    child = children()
    child.run(f"d = qsbr.SharedDomain({d.name!r}); h = d.register(); released = []")
    d.register()
    child.run("d.retire('x', released.append)")
    assert d.stats().threads == 2
    child.send("d.close(); out = released")
    with pytest.raises(ChildError, match="did not answer"):
        child.answer(timeout=0.3)  # waits for us: we are attached
    assert d.stats().threads == 1  # its slot was freed first
    d.detach()
    assert child.answer() == ["x"]
    with pytest.raises(ChildError, match="closed"):
        child.run("d.register()")


@native
def test_nothing_of_ours_triggers_the_resource_tracker(children) -> None:
    """A domain and a cell made by a process that exits stay for the others,
    and no process warns about leaked segments."""
    maker = children()
    name = maker.run("c = qsbr.SharedCell(create=True); c.publish(b'hello'); out = c.name")
    maker.send("c.close(); sys.exit(0)")
    assert maker.wait() == 0
    opener = children()
    assert opener.run(f"c = qsbr.SharedCell({name!r}); c.domain.register(); out = c.read_bytes()") == b"hello"
    opener.run("c.close(); c.unlink()")
    opener.send("sys.exit(0)")
    assert opener.wait() == 0
    assert (
        "resource_tracker" not in maker.stderr + opener.stderr
        and "leaked" not in maker.stderr + opener.stderr
    )
    assert not shm_names(name)


@native
def test_a_forked_child_does_not_inherit_slots(make_domain) -> None:
    d = make_domain()
    d.register()
    released: list[int] = []
    d.retire(1, released.append)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            ok = not d.is_registered() and d.pending == 0 and d.stats().forgotten_at_fork == 1
            d.register()
            d.unregister()
            code = 0 if ok else 2
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    try:
        assert os.read(r, 1) == b"\x00"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert d.stats().threads == 1


@native
def test_an_opener_waits_for_a_creator_still_writing_the_header() -> None:
    name = shm.new_name("qsbr_test_early_")
    mm = shm.create(name, sd.layout_words(4) * 8)  # sized, all zeros: no magic yet
    words = qsbr.kernel.SharedWords(mm)
    t = threading.Timer(0.1, sd.SharedDomain._initialize, (words, 4))
    t.start()
    try:
        d = qsbr.SharedDomain(name)
        assert d.capacity == 4 and d.wr_seq == 1
        d.close()
    finally:
        t.join(10)
        shm.unlink(name)
