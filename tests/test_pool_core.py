"""BufferPool's C fast path (buffer_pool.py, "The C fast path"; _kernel.c,
B1-B7): it serves what it can and passes everything else to the Python path,
so a pool behaves the same on both; these tests check that it is used, that
it agrees with the Python path step by step, and its own invariants."""

from __future__ import annotations

import gc
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest

import qsbr
from helpers import STEP_TIMEOUT, Worker, run_threads
from qsbr import kernel
from qsbr.buffer_pool import POLL_AFTER

NATIVE = kernel.PoolCore is not None
needs_native = pytest.mark.skipif(not NATIVE, reason="the C fast path is the native kernel's")


class PythonPathPool(qsbr.BufferPool):
    """A pool that never uses the C fast path: the reference."""

    _native = False


def test_a_plain_pool_runs_on_the_fast_path_exactly_when_the_kernel_is_native(domain: qsbr.Domain) -> None:
    pool = qsbr.BufferPool(domain=domain)
    assert (pool._core is not None) == (NATIVE and not domain.debug)
    assert PythonPathPool(domain=domain)._core is None
    assert qsbr.BufferPool(domain=domain, debug=True)._core is None

    class OwnAcquire(qsbr.BufferPool):
        def acquire(self, nbytes: int, *, timeout: float | None = None) -> memoryview:
            return super().acquire(nbytes, timeout=timeout)

    assert OwnAcquire(domain=domain)._core is None  # a subclass's own hot method is kept
    if pool._core is not None:
        v = pool.acquire(10)
        assert type(v.obj).__name__ == "PoolLease" and len(v) == 10 and v.format == "B" and not v.readonly
        pool.release(v)


def _script(pool: qsbr.BufferPool, domain: qsbr.Domain) -> list[Any]:
    """The same steps for both paths; what each step showed."""
    seen: list[Any] = []

    def step(name: str, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - the error is what is compared
            seen.append((name, "raises", type(exc).__name__, str(exc)))
            return None
        shown = (len(result), bytes(result[:4])) if isinstance(result, memoryview) else result
        seen.append((name, shown))
        return result

    def counts() -> Any:
        s = pool.stats()
        return (
            s.pages,
            s.bytes,
            s.bytes_out,
            s.bytes_waiting + s.bytes_free,
            s.large_blocks,
            {c: (k.in_use, k.waiting + k.free) for c, k in s.classes.items()},
        )

    a = step("acquire 100", lambda: pool.acquire(100))
    a[:4] = b"abcd"
    b = step("acquire 64", lambda: pool.acquire(64))
    empty = step("acquire 0", lambda: pool.acquire(0))
    big = step("acquire large", lambda: pool.acquire(70_000))
    for bad in (1.5, True, -1, None):
        step(f"acquire {bad!r}", lambda bad=bad: pool.acquire(bad))  # type: ignore[arg-type]
    step("acquire with timeout", lambda: pool.release(pool.acquire(64, timeout=1.0)))
    s1 = step("slice", lambda: pool.slice(a, 1, 3))
    s0 = step("empty slice", lambda: pool.slice(a, 2, 2))
    for start, stop in ((3, 1), (-1, 2), (0, 101), (0, 1 << 70)):
        step(f"slice {start}:{stop}", lambda start=start, stop=stop: pool.slice(a, start, stop))
    step("slice with a bool", lambda: pool.slice(a, True, 2))  # type: ignore[arg-type]
    step("slice of a copy", lambda: pool.slice(memoryview(a), 0, 1))
    step("slice of an empty view", lambda: pool.slice(empty, 0, 0))
    seen.append(("counts", counts()))
    step("release a copy", lambda: pool.release(memoryview(a)))
    step("release a memoryview slice", lambda: pool.release(a[1:3]))
    step("release foreign", lambda: pool.release(memoryview(bytearray(8))))
    step("release bytes", lambda: pool.release(b"x"))  # type: ignore[arg-type]
    step("release a", lambda: pool.release(a))
    seen.append(("counts", counts()))
    step("release a again", lambda: pool.release(a))
    step("slice of a released view", lambda: pool.slice(a, 0, 1))
    step("bytes of a slice after its view", lambda: bytes(s1))
    step("release the slice", lambda: pool.release(s1))
    step("release the empty slice", lambda: pool.release(s0))
    seen.append(("counts", counts()))
    b.release()  # memoryview.release(): the trap
    step("release a view released by memoryview", lambda: pool.release(b))
    step("release empty", lambda: pool.release(empty))
    step("release large", lambda: pool.release(big))
    seen.append(("counts", counts()))
    domain.barrier(timeout=STEP_TIMEOUT)
    for _ in range(3 * POLL_AFTER):
        pool.release(pool.acquire(64))
    seen.append(("counts after a loop", counts()))
    with pool.buffer(200) as v:
        v[0] = 7
    step("trim", lambda: isinstance(pool.trim(), int))
    pool.close()
    step("acquire after close", lambda: pool.acquire(64))
    return seen


def test_the_fast_path_agrees_with_the_python_path_step_by_step(scan: str) -> None:
    """Errors (type and message), views and the pool's counts, step by step.
    Each path gets its own domain (no thread registered: every grace period
    ends at the next poll), so the two runs see the same sequences."""
    results = []
    for cls in (qsbr.BufferPool, PythonPathPool):
        d = qsbr.Domain(scan=scan)
        try:
            results.append(_script(cls((64, 256, 1024), page_size=4096, domain=d), d))
        finally:
            d.close()
    fast, python = results
    assert len(fast) == len(python), (fast, python)
    for got, want in zip(fast, python, strict=True):
        assert got == want


def test_a_view_released_by_memoryview_is_refused_on_every_path(domain: qsbr.Domain) -> None:
    for pool in (qsbr.BufferPool(domain=domain), PythonPathPool(domain=domain)):
        with pool.acquire(64) as v:  # only the memoryview is released
            v[0] = 1
        with pytest.raises(ValueError, match=r"memoryview.release\(\).*pool.buffer\(n\)"):
            pool.release(v)
        assert pool.stats().classes[64].in_use == 1  # the block stays out, never reused early


def test_a_plain_acquire_release_loop_keeps_the_pool_small(domain: qsbr.Domain) -> None:
    """A thread that quiesces every 64 buffers, alone, in rounds (a longer
    gap between quiescent states at each round's start): blocks come back
    after a grace period and the pool stops growing, because the pool starts
    the grace period of its waiting blocks once POLL_AFTER come back in a
    row with one goal (B6). Before, it grew by a page of 64 KiB blocks every
    few thousand buffers, for good (both paths)."""
    if domain.debug:
        pytest.skip("debug mode retires each block to the domain instead")
    domain.register()
    try:
        pool = qsbr.BufferPool(domain=domain)
        pages = []
        for _ in range(16):
            for i in range(10_000):
                v = pool.acquire(65536)
                v[0] = 1
                pool.release(v)
                if i & 63 == 63:
                    domain.quiescent()
            pages.append(pool.stats().pages)
        assert pages[-1] == pages[-6] and pages[-1] <= 16, pages
    finally:
        domain.unregister()


@needs_native
def test_blocks_the_fast_path_holds_are_spilled_before_a_page_changes_class(domain: qsbr.Domain) -> None:
    """B1: a page whose blocks sit in the core's free stack is free for
    PageSet only after a spill: under max_bytes of one page, a request of
    another class must get that page (after the blocks' grace period)."""
    pool = qsbr.BufferPool((64, 4096), page_size=4096, max_bytes=4096, domain=domain, on_full="raise")
    views = [pool.acquire(64) for _ in range(8)]
    for v in views:
        pool.release(v)
    assert domain.synchronize(timeout=STEP_TIMEOUT)  # a grace period for all eight
    pool.release(pool.acquire(64))  # collected into the core's free stack (B5)
    assert pool._core.held[64][1] == 7
    assert domain.synchronize(timeout=STEP_TIMEOUT)
    big = pool.acquire(4096)  # the page changes class: the core gave its blocks back
    assert len(big) == 4096
    pool.release(big)


@needs_native
def test_the_fast_path_reuses_a_block_only_after_its_grace_period(
    domain: qsbr.Domain, worker: Worker
) -> None:
    """B5: a reader registered in another thread, inside its read, holds
    every released block back, however many the fast path has stocked."""
    pool = qsbr.BufferPool((64,), page_size=1 << 16, domain=domain)
    held = pool.acquire(64)
    held[:] = b"\x11" * 64
    worker.call(domain.register)
    for _ in range(4):
        pool.release(pool.acquire(64))
    pool.release(held)  # the reader may hold `held` now: it is attached
    for _ in range(20 * POLL_AFTER):
        v = pool.acquire(64)
        v[:] = b"\x22" * 64
        pool.release(v)
    assert bytes(held) == b"\x11" * 64, "a block reused under a reader"
    worker.call(domain.quiescent)
    worker.call(domain.unregister)


@needs_native
def test_frames_released_by_many_threads_give_each_block_back_once_on_the_fast_path(
    domain: qsbr.Domain,
) -> None:
    """B3 under threads: frames of one block released by three threads
    while the producer releases the block's own view; each block goes back
    to the core exactly once, after its last frame."""
    pool = qsbr.BufferPool((4096,), page_size=1 << 16, domain=domain)
    core = pool._core
    given_before = core.given_back
    queues: list[queue.Queue[memoryview | None]] = [queue.Queue() for _ in range(3)]
    blocks = 300

    def producer() -> None:
        for k in range(blocks):
            block = pool.acquire(4096)
            block[:] = bytes([k & 0xFF]) * 4096
            for i in range(64):
                queues[i % 3].put(pool.slice(block, i * 64, i * 64 + 64))
            pool.release(block)
        for q in queues:
            q.put(None)

    def consumer(q: queue.Queue[memoryview | None]) -> None:
        with domain.registered():
            while (frame := q.get(timeout=STEP_TIMEOUT)) is not None:
                first = frame[0]
                assert bytes(frame) == bytes([first]) * 64, "a frame changed under its reader"
                pool.release(frame)
                assert bytes(frame) == bytes([first]) * 64, "a block reused before a grace period"
                domain.quiescent()

    run_threads(producer, *(lambda q=q: consumer(q) for q in queues), timeout=90)
    assert core.given_back - given_before == blocks
    st = pool.stats()
    assert st.bytes_out == 0 and st.classes[4096].in_use == 0


@needs_native
def test_many_threads_on_one_pool_never_share_a_block(domain: qsbr.Domain) -> None:
    """Threads acquire, stamp, check and release at once (the core's lock on
    3.13t, the GIL otherwise): no block is out twice, none is reused early."""
    pool = qsbr.BufferPool((64, 1024), page_size=1 << 16, domain=domain)
    errors: list[str] = []

    def work(tag: int) -> None:
        with domain.registered():
            for i in range(3000):
                v = pool.acquire(64 if i & 1 else 1000)
                v[: len(v)] = bytes([tag]) * len(v)
                if i % 7 == 0:
                    s = pool.slice(v, 1, 9)
                    pool.release(s)
                if bytes(v) != bytes([tag]) * len(v):
                    errors.append(f"thread {tag}: a block shared")
                pool.release(v)
                if i % 16 == 0:
                    domain.quiescent()

    run_threads(*(lambda t=t: work(t) for t in range(1, 5)), timeout=120)
    assert not errors
    st = pool.stats()
    assert st.bytes_out == 0


@needs_native
def test_a_thread_reuses_the_blocks_another_thread_gave_back(domain: qsbr.Domain, worker: Worker) -> None:
    """B7: blocks that came back in one thread's shard serve another
    thread's acquires once safe (it takes them from that shard), rather
    than the pool growing a page for it."""
    pool = qsbr.BufferPool((4096,), page_size=1 << 16, domain=domain)  # 16 blocks a page
    views = [pool.acquire(4096) for _ in range(16)]
    leases = {id(v.obj): v.obj for v in views}  # each block's root lease, reused by its next acquire
    for v in views:
        pool.release(v)
    del views
    assert domain.synchronize(timeout=STEP_TIMEOUT)
    taken = worker.call(lambda: [pool.acquire(4096) for _ in range(16)])
    # Served from the first thread's shard by C: the same leases, no Python
    # path (which would have spilled the blocks and made new leases).
    assert all(leases.get(id(v.obj)) is v.obj for v in taken)
    assert pool.stats().pages == 1
    for v in taken:
        pool.release(v)


@needs_native
def test_a_view_dropped_while_out_is_collected_and_its_block_stays_out(domain: qsbr.Domain) -> None:
    """The cycle view -> lease -> view of a view never released is freed by
    the collector; its block is lost to the pool (counted out), as on the
    Python path, never reused under a holder."""
    pool = qsbr.BufferPool((64,), page_size=4096, domain=domain)

    def leases() -> int:
        gc.collect()
        return sum(type(o).__name__ == "PoolLease" for o in gc.get_objects())

    before = leases()
    v = pool.acquire(64)
    assert leases() == before + 1
    del v
    assert leases() == before
    assert pool.stats().classes[64].in_use == 1


@needs_native
def test_location_of_a_fast_path_view_and_its_slice(domain: qsbr.Domain) -> None:
    pool = qsbr.BufferPool((256,), page_size=4096, domain=domain)
    a, b = pool.acquire(200), pool.acquire(200)
    s = pool.slice(b, 10, 20)
    mem_a, off_a = pool._location(a)
    mem_s, off_s = pool._location(s)
    assert mem_a is mem_s and off_s - off_a in (256 + 10, -256 + 10)
    b[10:12] = b"zz"
    assert bytes(memoryview(mem_s).cast("B")[off_s : off_s + 2]) == b"zz"


def test_threads_race_releases_and_slices_of_one_view(domain: qsbr.Domain, worker: Worker) -> None:
    """Two threads release the same view at once, many times: one release
    wins, the other gets the "not out" error; the block goes back once."""
    pool = qsbr.BufferPool((64,), page_size=4096, domain=domain)
    for _ in range(200):
        v = pool.acquire(64)
        outcomes: list[str] = []
        barrier = threading.Barrier(2, timeout=STEP_TIMEOUT)

        def release(v: memoryview = v, outcomes: list[str] = outcomes, barrier: Any = barrier) -> None:
            barrier.wait()
            try:
                pool.release(v)
                outcomes.append("ok")
            except ValueError:
                outcomes.append("refused")

        run_threads(release, release, timeout=30)
        assert sorted(outcomes) == ["ok", "refused"]
    st = pool.stats()
    assert st.classes[64].in_use == 0 and st.bytes_out == 0  # each block back exactly once
    if pool._core is not None:
        assert pool._core.given_back == 200
