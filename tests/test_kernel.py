"""The kernel seam: which twin runs, that the twins agree, and that the C one
neither leaks nor re-enables the GIL.

The whole suite runs on both twins (`.ci/run`: make test, and again with
QSBR_PURE_PYTHON=1). This module checks what the rest cannot see: the choice
itself, the twins side by side in one process, reference counts and memory
over long loops, and the per-thread cache of the C twin (_kernel.c, I5).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import sysconfig
import threading
import tracemalloc
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

import qsbr
from qsbr import _pykernel, kernel
from qsbr.errors import NotRegisteredError

try:
    from qsbr import _kernel as native_kernel
except ImportError:  # not built for this interpreter
    native_kernel = None

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
TWINS = [pytest.param(_pykernel, id="python")] + (
    [pytest.param(native_kernel, id="native")] if native_kernel is not None else []
)


def _run(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "QSBR_PURE_PYTHON"}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


# -- the choice -----------------------------------------------------------------


def test_the_kernel_is_the_one_this_run_expects() -> None:
    """`make test` says which kernel it means (QSBR_EXPECT_KERNEL): a C kernel
    that failed to build must fail the run, not fall back in silence."""
    expected = os.environ.get("QSBR_EXPECT_KERNEL")
    if expected is None:
        pytest.skip("QSBR_EXPECT_KERNEL not set (make test sets it)")
    assert qsbr.implementation == expected, kernel.native_error


def test_qsbr_pure_python_forces_the_python_twin() -> None:
    assert _run("import qsbr; print(qsbr.implementation)", QSBR_PURE_PYTHON="1") == "python"
    assert _run("import qsbr; print(qsbr.kernel.native_error)", QSBR_PURE_PYTHON="1") == (
        "QSBR_PURE_PYTHON is set"
    )


@pytest.mark.skipif(native_kernel is None, reason="the C kernel is not built for this interpreter")
def test_without_the_variable_the_native_twin_is_chosen() -> None:
    assert _run("import qsbr; print(qsbr.implementation)") == "native"
    assert _run("import qsbr; print(qsbr.implementation)", QSBR_PURE_PYTHON="0") == "native"


@pytest.mark.skipif(not FREE_THREADED, reason="free-threaded builds only")
def test_importing_qsbr_does_not_re_enable_the_gil() -> None:
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "import qsbr, qsbr.cli, qsbr.demo\n"
        "d = qsbr.Domain()\n"
        "with d.attached():\n"
        "    pass\n"
        "print(qsbr.implementation, sys._is_gil_enabled())\n"
    )
    out = _run(code)
    assert out.endswith("False"), out
    if native_kernel is not None:
        assert out == "native False"


# -- the twins side by side ----------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
def test_scan_slots_agrees_on_both_twins(twin: ModuleType) -> None:
    domain = qsbr.Domain()
    states: list[Any] = []
    done = threading.Event()
    ready = threading.Barrier(4, timeout=10)

    def reader(detach: bool) -> None:
        domain.register()
        if detach:
            domain.detach()
        states.append(domain._tls.state)
        ready.wait()
        done.wait(10)
        domain.unregister()

    threads = [threading.Thread(target=reader, args=(i == 1,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        ready.wait()
        domain.advance()
        slots = list(domain._registry.slots) + [None]
        if twin is native_kernel and kernel.IMPLEMENTATION != "native":
            pytest.skip("the C twin scans only the C twin's thread states")
        lowest, found, attached = twin.scan_slots(slots, 0, len(slots), domain.wr_seq)
        assert attached == 2
        assert lowest == 1 and found is not None and found.seq == 1
        assert twin.scan_slots(slots, 0, 0, 7) == (7, None, 0)
        assert twin.scan_slots(slots, 1, len(slots), 1) == (1, None, attached - (slots[0].seq != 0))
    finally:
        done.set()
        for t in threads:
            t.join(10)


@pytest.mark.parametrize("twin", TWINS)
def test_run_entries_agrees_on_both_twins(twin: ModuleType) -> None:
    """The loop that runs a batch: errors to on_error, a BaseException (or a
    failing on_error) stops it and is returned, sizes past 64 bits add up."""
    ran: list[Any] = []
    seen: list[tuple[str, Any]] = []

    def ok(arg: Any) -> None:
        ran.append(arg)

    def fails(arg: Any) -> None:
        ran.append(arg)
        raise ValueError(arg)

    def interrupts(arg: Any) -> None:
        ran.append(arg)
        raise KeyboardInterrupt

    def on_error(exc: BaseException, arg: Any) -> None:
        seen.append((type(exc).__name__, arg))

    big = 1 << 70
    chunk = [1, ok, "a", 3, 1, fails, "b", big, 3, ok, "c", 4]
    assert twin.run_entries(chunk, on_error) == (3, 7 + big, 1, None)
    assert ran == ["a", "b", "c"] and seen == [("ValueError", "b")]
    assert chunk[1] is ok  # the chunk is left as it was: the caller owns it

    ran.clear()
    n, freed, errors, stopped = twin.run_entries(
        [1, ok, "a", 1, 1, interrupts, "b", 2, 1, ok, "c", 4], on_error
    )
    assert (n, freed, errors) == (2, 3, 0) and isinstance(stopped, KeyboardInterrupt)
    assert stopped.__traceback__ is not None and ran == ["a", "b"]

    def handler_fails(exc: BaseException, arg: Any) -> None:
        raise RuntimeError("handler")

    ran.clear()
    n, freed, errors, stopped = twin.run_entries([1, fails, "x", 5, 1, ok, "y", 5], handler_fails)
    assert (n, freed, errors, type(stopped)) == (1, 5, 1, RuntimeError) and ran == ["x"]
    assert twin.run_entries([], on_error) == (0, 0, 0, None)


@pytest.mark.parametrize("twin", TWINS)
def test_grace_timing_agrees_on_both_twins(twin: ModuleType) -> None:
    """The records of advances (timing.py): what stall reports and the grace
    period statistics read, the same on both twins, KEPT included."""
    import time

    t = twin.GraceTiming()
    assert (t.current(1), t.advanced_past(1), t.longest, t.outstanding) == (0.0, None, 0.0, 0)
    before = time.monotonic()
    for seq in (3, 5, 7):
        t.advanced(seq)
    after = time.monotonic()
    assert t.outstanding == 3
    first = t.advanced_past(1)
    assert first is not None and before <= first <= after  # time.monotonic()'s clock
    assert t.advanced_past(2) == first and t.advanced_past(5) >= first
    assert t.advanced_past(7) is None
    assert t.current(1) >= 0.0 and t.current(7) == 0.0
    time.sleep(0.02)
    t.covered(5)
    assert t.outstanding == 1 and t.longest >= 0.02
    t.covered(5)  # nothing more covered: nothing changes
    assert t.outstanding == 1
    t.covered(7)
    assert t.outstanding == 0 and t.current(7) == 0.0
    for i in range(5000):  # past KEPT outstanding, advances are not timed
        t.advanced(9 + 2 * i)
    assert t.outstanding == 4096
    assert t.advanced_past(9 + 2 * 4096) is None
    t.covered(1 << 40)
    assert t.outstanding == 0
    t.advanced(1 << 41)  # room again after everything was covered
    assert t.outstanding == 1


@pytest.mark.parametrize("kind", ["attached", "detached"])
def test_sections_nest_at_most_max_depth_and_an_unmatched_exit_raises(domain: qsbr.Domain, kind: str) -> None:
    """The same limits and errors on both twins (this runs on each)."""
    domain.register()
    section = getattr(domain, kind)()
    assert kernel.MAX_DEPTH == 62
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        section.__exit__(None, None, None)
    entered = 0
    try:
        for _ in range(kernel.MAX_DEPTH):
            section.__enter__()
            entered += 1
        assert section.depth == kernel.MAX_DEPTH
        with pytest.raises(RuntimeError, match="nest at most 62 deep"):
            section.__enter__()
        assert section.depth == kernel.MAX_DEPTH
    finally:
        for _ in range(entered):
            section.__exit__(None, None, None)
    assert section.depth == 0
    assert domain.is_attached()
    domain.unregister()


# -- the C twin's per-thread cache (_kernel.c, I5) -------------------------------------------


def _in_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(30)
    assert not t.is_alive()
    return out[0]


def test_a_thread_that_left_gets_the_error_not_its_old_state(domain: qsbr.Domain) -> None:
    def body() -> str:
        domain.register()
        domain.quiescent()  # fills the cache
        domain.unregister()
        try:
            domain.quiescent()
        except NotRegisteredError:
            pass
        else:
            return "quiescent() after unregister() did not raise"
        domain.register()  # a new state: the cache must not answer with the old one
        domain.advance()
        domain.quiescent()
        seq = domain._tls.state.seq
        domain.unregister()
        return "ok" if seq == domain.wr_seq else f"quiescent() stored into the old state ({seq})"

    assert _in_thread(body) == "ok"


def test_two_domains_on_one_thread_keep_their_own_states() -> None:
    a, b = qsbr.Domain(), qsbr.Domain()
    a.register()
    b.register()
    try:
        for _ in range(3):
            a.advance()
            b.advance()
            b.advance()
            a.quiescent()
            b.quiescent()
            assert a._tls.state.seq == a.wr_seq and b._tls.state.seq == b.wr_seq
        b.detach()
        a.quiescent()
        b.quiescent()  # detached in b: stays so
        assert b._tls.state.seq == 0 and a._tls.state.seq == a.wr_seq
        b.attach()
    finally:
        a.unregister()
        b.unregister()


def test_the_cache_keeps_no_domain_alive() -> None:
    """A domain dropped while this thread is still registered (and cached)
    is collected: the cache's reference is borrowed."""
    d = qsbr.Domain()
    d.register()
    d.quiescent()
    with d.attached():
        pass
    ref = weakref.ref(d)
    del d
    gc.collect()
    assert ref() is None
    fresh = qsbr.Domain()  # a new domain never sees the dead one's entry
    with pytest.raises(NotRegisteredError):
        fresh.quiescent()


# -- leaks: reference counts and memory flat over long loops ----------------------------------


def _hot_loop(domain: qsbr.Domain, n: int) -> None:
    handle = domain.register()
    for _ in range(n):
        domain.quiescent()
        handle.quiescent()
        with domain.attached():
            pass
        with domain.detached():
            pass
        with handle.attached():
            pass
        domain.detach()
        domain.attach()
    domain.unregister()


def test_hot_calls_leave_reference_counts_unchanged() -> None:
    domain = qsbr.Domain()
    _hot_loop(domain, 10)
    domain.register()
    state = domain._tls.state
    section, detached, handle = state.read_section, state.detached_section, state.handle
    watched = [domain, state, section, detached, handle]
    before = [sys.getrefcount(o) for o in watched]
    for _ in range(1000):
        domain.quiescent()
        handle.quiescent()
        with domain.attached():
            pass
        with domain.detached():
            pass
    after = [sys.getrefcount(o) for o in watched]
    assert after == before
    domain.unregister()


def _memory_growth(step: Callable[[], None], rounds: int = 5, warmup: int = 2) -> list[int]:
    """Traced bytes after each round, traced from after ``warmup`` rounds
    (dict and list tables and free lists grow to their working size
    first). Do not raise the warm-up to make a test pass: a kernel that
    built its method names per slow-path call kept memory that "settled"
    after about 8 rounds on 3.13t and grew for thousands of calls on 3.11."""
    for _ in range(warmup):
        step()
    gc.collect()
    tracemalloc.start()
    try:
        sizes = []
        for _ in range(rounds):
            step()
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0])
        return sizes
    finally:
        tracemalloc.stop()


def _assert_flat(sizes: list[int], slack: int = 16 << 10) -> None:
    # Measured flat within a few KB over the rounds after the warm-up; one
    # list leaked per poll of the retire loop adds about 15 KB a round (a
    # mutant of scan_slots() that did so grew 60 KB in four rounds). The
    # slack covers the interpreter's own caches settling.
    assert max(sizes) - sizes[0] < slack, sizes


def test_memory_is_flat_over_register_read_and_threads_coming_and_going() -> None:
    domain = qsbr.Domain()

    def step() -> None:
        _hot_loop(domain, 2000)
        for _ in range(20):
            _in_thread(lambda: _hot_loop(domain, 10))

    _assert_flat(_memory_growth(step))


def test_memory_is_flat_over_registrations() -> None:
    """Each registration makes a thread state (the C kernel allocates its
    deferred-free list) and takes the kernel's slow path once (the
    per-thread cache misses); nothing of either may outlive the
    registration. (A kernel that leaked one list per state failed this.)"""
    domain = qsbr.Domain()

    def step() -> None:
        for _ in range(1000):
            with domain.registered():
                domain.quiescent()

    _assert_flat(_memory_growth(step), slack=8 << 10)


def test_memory_is_flat_over_retire_poll_cell_and_pool_loops() -> None:
    domain = qsbr.Domain()
    cell: qsbr.Cell[list[int]] = qsbr.Cell([0], domain=domain)
    pool = qsbr.BufferPool(domain=domain)

    def step() -> None:
        with domain.registered():
            for i in range(2000):
                domain.retire([i], lambda obj: None)
                cell.set([i])
                _ = cell.value
                buf = pool.acquire(256)
                buf[0] = 1
                frame = pool.slice(buf, 1, 9)
                pool.release(buf)
                pool.release(frame)
                if i % 500 == 0:
                    pool.stats()  # spills the C fast path's blocks back to the pages
                domain.quiescent()
            domain.barrier(10)

    _assert_flat(_memory_growth(step))


@pytest.mark.skipif(kernel.IMPLEMENTATION != "native", reason="the C kernel only")
def test_domain_has_its_own_c_methods_and_subclasses_still_work() -> None:
    """kernel.specialize(Domain): the readers' calls are method descriptors
    made for Domain itself (CPython specializes their calls only then); a
    subclass of Domain uses them through the generic path, correctly."""
    for name in ("quiescent", "attach", "detach", "attached", "detached"):
        descr = qsbr.Domain.__dict__[name]
        assert descr.__objclass__ is qsbr.Domain, name

    class Sub(qsbr.Domain):
        pass

    d = Sub()
    d.register()
    d.advance()
    d.quiescent()
    assert d._tls.state.seq == d.wr_seq
    with d.detached():
        assert not d.is_attached()
    with d.attached():
        assert d.is_attached()
    d.unregister()
    with pytest.raises(TypeError, match="subclass of DomainCore"):
        kernel.specialize(int)


def test_retire_fast_path_does_what_the_python_path_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """retire() (on the C kernel, its fast path: _kernel.c, I6, I7, I8) and
    Domain._retire_python, fed the same calls on two identical domains,
    leave identical goals, entries, counters, skipped polls, timing records
    and backlogs. On the pure kernel retire is _retire_python itself, and
    this holds trivially."""
    import array

    import qsbr.domain

    # Skipped polls depend on the clock (a full poll is due 1 ms after the
    # last): a long interval keeps the two domains' calls in step.
    monkeypatch.setattr(qsbr.domain, "PINNED_POLL_NS", 60 * 10**9)

    a = qsbr.Domain(deferred_limit=4, deferred_bytes=100)
    b = qsbr.Domain(deferred_limit=4, deferred_bytes=100)
    released: list[Any] = []
    objs: list[Any] = [object(), b"x" * 10, memoryview(bytearray(64)), array.array("q", [1, 2]), "s" * 3]

    def calls() -> list[tuple[Any, dict[str, Any]]]:
        out: list[tuple[Any, dict[str, Any]]] = []
        for i in range(60):
            obj = objs[i % len(objs)]
            out.append((obj, {} if i % 3 else {"size": i}))
        return out

    a.register()
    b.register()
    try:
        for obj, kw in calls():
            ga = a.retire(obj, released.append, **kw)
            gb = b._retire_python(obj, released.append, **kw)
            assert ga == gb
            sa, sb = a._tls.state, b._tls.state
            assert (sa.deferrals, sa.retired_bytes, sa.bytes_at_advance, sa.listed) == (
                sb.deferrals,
                sb.retired_bytes,
                sb.bytes_at_advance,
                sb.listed,
            )
            assert sa.deferred == sb.deferred
            assert (sa.pinned_seq, sa.poll_due != 0) == (sb.pinned_seq, sb.poll_due != 0)
            assert a.wr_seq == b.wr_seq and a.pending == b.pending and a.pending_bytes == b.pending_bytes
            ta, tb = a.stats(), b.stats()
            assert (ta.advances, ta.polls, ta.failed_polls) == (tb.advances, tb.polls, tb.failed_polls)
            assert a._timing.outstanding == b._timing.outstanding
        assert released == []  # a lone thread's plain polls keep what it may still hold
        # Errors are the Python path's.
        for bad in ({"size": -1}, {"size": 1.5}, {"size": True}):
            with pytest.raises((TypeError, ValueError)) as ea:
                a.retire(object(), released.append, **bad)
            with pytest.raises((TypeError, ValueError)) as eb:
                b._retire_python(object(), released.append, **bad)
            assert (type(ea.value), str(ea.value)) == (type(eb.value), str(eb.value))
        with pytest.raises(TypeError, match="callable"):
            a.retire(object(), "not callable")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            a.retire(object(), released.append, sized=3)  # type: ignore[call-arg]
        assert a.barrier(10) and b.barrier(10)
        assert len(released) == 120
    finally:
        a.unregister()
        b.unregister()

    def other_thread() -> str:
        try:
            a.retire(object(), released.append)
        except NotRegisteredError:
            return "raised"
        return "did not raise"

    assert _in_thread(other_thread) == "raised"


def test_retire_skips_polls_that_cannot_find_anything_and_counts_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer that retires many objects between two quiescent states holds
    rd_seq where its own seq is: its polls from retire() are skipped (each
    counted as a failed poll, without a scan) until its next quiescent
    state, or until a full poll is due (PINNED_POLL_NS after the last)."""
    import qsbr.domain

    monkeypatch.setattr(qsbr.domain, "PINNED_POLL_NS", 60 * 10**9)
    released: list[int] = []
    d = qsbr.Domain(deferred_limit=2)
    d.register()
    try:
        for i in range(20):
            d.retire(i, released.append, size=1)
        s = d.stats()
        assert (s.advances, s.polls, s.failed_polls) == (10, 10, 10)
        assert d._skipped_polls == 9  # only the first poll ran: the other nine were skipped
        assert released == [] and d.pending == 20
        d.quiescent()  # a new seq: the next poll is a full one, and finds work
        d.retire(20, released.append, size=1)
        d.retire(21, released.append, size=1)
        assert released == list(range(20))
        assert d._skipped_polls == 9
        # With no interval every poll is a full one again.
        monkeypatch.setattr(qsbr.domain, "PINNED_POLL_NS", 0)
        d.quiescent()
        d.retire(22, released.append, size=1)
        d.retire(23, released.append, size=1)  # an advance: a full poll, due again at once
        before, skipped = d.stats(), d._skipped_polls
        for i in range(24, 34):
            d.retire(i, released.append, size=1)
        after = d.stats()
        assert after.polls - before.polls == 5 and d._skipped_polls == skipped
        assert d.barrier(10) and released == list(range(34))
    finally:
        d.unregister()


def test_retire_takes_the_python_path_for_caps_debug_and_mutants() -> None:
    """A capped or debug domain, or one whose goal rule is overridden, never
    takes the fast path: the cap, the double-retire check and the mutant's
    goal all apply."""
    capped = qsbr.Domain(max_pending=2, on_full="raise")
    with capped.registered():
        capped.retire(object(), lambda o: None)
        capped.retire(object(), lambda o: None)
        with pytest.raises(qsbr.PendingLimitError):
            capped.retire(object(), lambda o: None)
    debug = qsbr.Domain(debug=True)
    with debug.registered():
        obj = object()
        debug.retire(obj, lambda o: None)
        with pytest.raises(ValueError):
            debug.retire(obj, lambda o: None)

    class OldGoal(qsbr.Domain):
        def _take_goal(self, counter: Any) -> int:
            return self._wr_seq

    mutant = OldGoal()
    with mutant.registered():
        for _ in range(3):
            assert mutant.retire(object(), lambda o: None) == mutant.wr_seq
