"""BufferPool: zero-copy blocks reused only after a grace period
(docs/api.md, "qsbr.BufferPool"). Every test runs under both rd_seq
strategies, and with the domain in debug mode too."""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import qsbr
from helpers import STEP_TIMEOUT, Worker, run_threads, wait_until
from qsbr.buffer_pool import POISON, POLL_AFTER
from qsbr.pool_pages import Block, PageSet

#: Run every test here with the domain in debug mode too (conftest.py).
DEBUG_TOO = True


def test_pool_acquire_sizes_and_errors(domain: qsbr.Domain) -> None:
    pool = qsbr.BufferPool(domain=domain)
    v = pool.acquire(100)
    assert len(v) == 100 and not v.readonly and v.format == "B"
    st = pool.stats().classes
    assert st[256].in_use == 1 and st[64].in_use == 0
    assert pool.stats()["pages"] == pool.stats().pages == 1
    assert set(pool.stats().as_dict()["classes"]) == {64, 256, 1024, 4096, 16384, 65536}
    assert len(pool.acquire(65536)) == 65536
    for bad in (1.5, "10", True, None):
        with pytest.raises(TypeError, match="int number of bytes"):
            pool.acquire(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        pool.acquire(-1)
    with pytest.raises(ValueError, match="released already, or it did not come from this pool"):
        pool.release(memoryview(bytearray(100)))  # foreign
    with pytest.raises(ValueError, match="not out"):
        pool.release(v[:10])  # a slice made by memoryview, not by pool.slice()
    for bad_view in (None, b"abc", bytearray(3)):
        with pytest.raises(TypeError, match="needs a view from this pool"):
            pool.release(bad_view)  # type: ignore[arg-type]
    pool.release(v)
    with pytest.raises(ValueError, match="released already"):
        pool.release(v)
    for kwargs in ({"size_classes": ()}, {"size_classes": (0,)}, {"page_size": 0}, {"max_bytes": 10}):
        with pytest.raises(ValueError):
            qsbr.BufferPool(**kwargs)  # type: ignore[arg-type]
    for kwargs in ({"size_classes": ("64",)}, {"page_size": 1.5}, {"max_bytes": "1"}, {"on_full": 1}):
        with pytest.raises(TypeError):
            qsbr.BufferPool(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='on_full must be "block" or "raise"'):
        qsbr.BufferPool(on_full="drop")
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        pool.acquire(10)


def test_an_empty_frame_is_a_view_like_any_other(domain: qsbr.Domain) -> None:
    pool = qsbr.BufferPool(domain=domain)
    e = pool.acquire(0)
    assert isinstance(e, memoryview) and len(e) == 0
    assert pool.acquire(0) is not e
    pool.release(e)
    with pytest.raises(ValueError, match="released already"):
        pool.release(e)
    assert pool.stats().bytes_out == 0


def test_requests_above_the_largest_class_get_a_block_of_their_own(
    domain: qsbr.Domain, worker: Worker
) -> None:
    """shared/repros/pipeline/shared_array_big.py: bigger storage was refused
    (ValueError) or bypassed the pool; now it is served, counted, and kept
    until its grace period is over, under max_bytes too."""
    pool = qsbr.BufferPool(domain=domain, page_size=1 << 16, max_bytes=1 << 20, on_full="raise")
    big = pool.acquire(300_000)
    assert len(big) == 300_000
    big[-1] = 7
    s = pool.stats()
    assert (s.large_blocks, s.large_bytes, s.bytes_out) == (1, 300_000, 300_000)
    worker.call(domain.register)  # a reader holds it back
    pool.release(big)
    assert pool.stats().bytes_waiting == 300_000
    with pytest.raises(qsbr.PoolExhaustedError):
        pool.acquire(800_000)  # the released one still counts
    worker.call(domain.quiescent)
    again = pool.acquire(800_000)  # freed after its grace period: room again
    assert len(again) == 800_000 and pool.stats().large_blocks == 1
    pool.release(again)
    worker.call(domain.unregister)
    a = qsbr.SharedArray("q", pool=pool)
    a.extend(range(20_000))  # 160 KB of storage: through the pool
    with domain.attached():
        assert len(a) == 20_000 and a[-1] == 19_999
    domain.unregister()


def test_frames_share_a_block_that_returns_when_every_frame_is_released(
    domain: qsbr.Domain, worker: Worker
) -> None:
    pool = qsbr.BufferPool((1024,), page_size=1024, max_bytes=1024, on_full="raise", domain=domain)
    block = pool.acquire(1000)
    block[:] = bytes(range(250)) * 4
    frames = [pool.slice(block, 100 * k, 100 * (k + 1)) for k in range(10)]
    assert bytes(frames[3]) == bytes(block[300:400]) and frames[3].format == "B"
    inner = pool.slice(frames[9], 10, 20)  # a slice of a slice
    assert bytes(inner) == bytes(block[910:920])
    empty = pool.slice(block, 5, 5)
    assert empty.nbytes == 0
    with pytest.raises(ValueError, match="start <= stop"):
        pool.slice(block, 10, 2000)
    with pytest.raises(TypeError, match="start must be an int"):
        pool.slice(block, 1.0, 2)  # type: ignore[arg-type]
    pool.release(block)  # the block's own view first: the frames keep it out
    for f in frames:
        pool.release(f)
    assert pool.stats().classes[1024].in_use == 1  # `inner` and the empty slice are still out
    with pytest.raises(ValueError, match="released already"):
        pool.release(frames[0])
    with pytest.raises(ValueError, match="not out"):
        pool.slice(frames[0], 0, 1)
    pool.release(inner)
    with pytest.raises(qsbr.PoolExhaustedError):
        pool.acquire(1000)  # one slice is still out
    pool.release(empty)
    assert pool.stats().classes[1024].waiting == 1
    assert len(pool.acquire(1000)) == 1000  # back, and safe: nobody is attached


def test_buffer_gives_the_block_back(domain: qsbr.Domain) -> None:
    pool = qsbr.BufferPool(domain=domain)
    with pool.buffer(100) as v:
        v[:4] = b"abcd"
        assert pool.stats().bytes_out == 256
    assert pool.stats().bytes_out == 0 and pool.stats().classes[256].waiting == 1


def test_a_block_never_given_back_is_reported_in_debug_mode(
    domain: qsbr.Domain, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="qsbr")
    pool = qsbr.BufferPool(domain=domain, debug=True)
    with pool.acquire(64) as v:  # the trap: only the memoryview is released
        v[0] = 1
    pool.acquire(100)  # dropped at once, never released
    gc.collect()
    pool.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "qsbr"]
    assert len(messages) == 2, messages
    assert all("never given back" in m and "pool.buffer(n)" in m for m in messages)


def test_a_view_dropped_inside_the_pools_own_locked_section_does_not_deadlock(
    domain: qsbr.Domain, worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    # A collection can start at any allocation, also while a thread is
    # inside the pool's lock (in release(), say); the weak-reference callback
    # of an unreleased view it frees then runs in that thread. It waited for
    # the lock, and the thread deadlocked with itself (seen on 3.13t under
    # the threaded pool test). Here the drop happens under the lock on purpose.
    caplog.set_level(logging.WARNING, logger="qsbr")
    pool = qsbr.BufferPool(domain=domain, debug=True)

    def drop_while_holding_the_lock() -> None:
        # Made and dropped by one thread: on 3.13t an object whose last
        # reference another thread drops is freed later, by its owner.
        views = [pool.acquire(64)]
        with pool._lock:
            views.clear()  # the last reference: the callback runs here

    worker.call(drop_while_holding_the_lock)  # raises queue.Empty if it hangs
    assert not [r for r in caplog.records if r.name == "qsbr"]  # noted, not yet checked
    pool.release(pool.acquire(64))  # the next acquire looks
    messages = [r.getMessage() for r in caplog.records if r.name == "qsbr"]
    assert len(messages) == 1 and "never given back" in messages[0], messages
    pool.close()
    assert len([r for r in caplog.records if r.name == "qsbr"]) == 1  # reported once


def test_the_releasing_thread_may_read_its_view_until_its_quiescent_state_even_alone(
    domain: qsbr.Domain,
) -> None:
    # release() promises every holder, the releasing thread included, its
    # view until that thread's next quiescent state. When it was the only
    # attached thread, the domain's not-shared fast path ran a debug pool's
    # grace-period callback at its next poll: the block was poisoned under
    # the reader (the threaded pool test, about one run in thirty on 3.13t).
    pool = qsbr.BufferPool((64,), domain=domain)  # debug when the domain is
    with domain.registered():
        v = pool.acquire(64)
        v[:] = b"\x01" * 64
        pool.release(v)
        domain.poll()
        assert pool.acquire(64) is not None  # another block: this one is not free yet
        assert bytes(v) == b"\x01" * 64
        assert domain.synchronize(timeout=STEP_TIMEOUT)  # a grace period: the thread is quiescent in it
        domain.poll()
        if domain.debug:  # now its grace period is over: poisoned
            assert bytes(v) == bytes([POISON]) * 64


def test_pool_reuses_a_block_only_after_a_grace_period(domain: qsbr.Domain, worker: Worker) -> None:
    pool = qsbr.BufferPool((256,), page_size=1024, max_bytes=2048, debug=True, domain=domain, on_full="raise")
    worker.call(domain.register)  # a reader that holds the view below
    v = pool.acquire(256)
    v[:] = b"\x07" * 256
    reader_view = worker.call(lambda: v[:])  # the reader's own slice of the block
    pool.release(v)
    others = [pool.acquire(256) for _ in range(7)]  # the other 7 blocks of 2 pages
    for o in others:
        o[:] = b"\xff" * 256
    assert bytes(reader_view) == b"\x07" * 256  # untouched: not reused
    with pytest.raises(qsbr.PoolExhaustedError, match="max_bytes=2,048") as info:
        pool.acquire(256)  # only the waiting block is left, and it is not safe
    err = info.value
    assert isinstance(err, MemoryError) and err.bytes_out == 7 * 256 and err.bytes_waiting == 256
    assert [h.thread_name for h in err.holders] == ["worker"] and "'worker'" in str(err)
    assert pool.stats().classes[256].waiting == 1 and pool.stats().exhausted == 1
    worker.call(domain.quiescent)  # the reader is done with it
    again = pool.acquire(256)
    assert bytes(reader_view) == bytes([POISON]) * 256  # same block, poisoned when safe
    assert bytes(again) == bytes(reader_view)
    worker.call(domain.unregister)


def test_debug_poisons_when_the_grace_period_ends_and_catches_a_stale_write(domain: qsbr.Domain) -> None:
    """shared/repros/pipeline/debug_poison.py: the poison came only at the next
    acquire(), and a write through a stale view after reuse went unnoticed."""
    pool = qsbr.BufferPool(domain=domain, debug=True)
    v = pool.acquire(64)
    v[:] = b"A" * 64
    stale = v  # kept past the release: the bug under test
    pool.release(v)
    assert domain.synchronize(timeout=STEP_TIMEOUT)
    domain.poll()  # the grace period is over: poisoned now, not at the next acquire
    assert bytes(stale[:4]) == bytes([POISON]) * 4
    stale[:4] = b"EVIL"  # a write through the stale view
    with pytest.raises(qsbr.UseAfterReleaseError, match="written after its grace period"):
        pool.acquire(64)
    w = pool.acquire(64)  # the block is poisoned again and reused
    assert len(w) == 64
    assert issubclass(qsbr.UseAfterReleaseError, RuntimeError)


def test_a_debug_domain_makes_its_pools_debug(scan: str) -> None:
    d = qsbr.Domain(scan=scan, debug=True)
    assert qsbr.BufferPool(domain=d).debug and not qsbr.BufferPool(domain=qsbr.Domain()).debug
    d.close()


def test_acquire_blocks_until_a_block_is_safe_then_times_out(domain: qsbr.Domain, worker: Worker) -> None:
    """Backpressure instead of MemoryError: the caller waits (counted as
    quiescent) for the grace period of a released block, or raises after
    its timeout."""
    pool = qsbr.BufferPool((1024,), page_size=1024, max_bytes=1024, domain=domain)
    worker.call(domain.register)
    pool.release(pool.acquire(1000))  # waits for the worker
    t0 = time.monotonic()
    with pytest.raises(qsbr.PoolExhaustedError, match="after waiting") as info:
        pool.acquire(1000, timeout=0.2)
    assert time.monotonic() - t0 >= 0.2 and info.value.waited >= 0.2
    got: list[memoryview] = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(1000)))
    t.start()
    # Until the thread is in its wait: on a loaded machine it may not even
    # have started after a fixed sleep, and then found the block safe.
    assert wait_until(lambda: pool.stats().full_waits == 2)
    assert not got  # still waiting
    worker.call(domain.quiescent)  # the reader lets go: the block is safe
    t.join(STEP_TIMEOUT)
    assert len(got) == 1 and pool.stats().full_waits == 2
    worker.call(domain.unregister)


def test_a_registered_waiter_counts_as_quiescent(domain: qsbr.Domain) -> None:
    """Two registered threads each hold a released block back from the other
    only if waiting did not count as quiescent."""
    pool = qsbr.BufferPool((1024,), page_size=2048, max_bytes=2048, domain=domain)

    def each() -> None:
        with domain.registered():
            for _ in range(20):
                v = pool.acquire(1000, timeout=STEP_TIMEOUT)
                pool.release(v)
                domain.quiescent()

    run_threads(each, each, each)


def test_trim_gives_free_pages_back(domain: qsbr.Domain) -> None:
    pool = qsbr.BufferPool((1024,), page_size=4096, domain=domain)
    views = [pool.acquire(1000) for _ in range(12)]  # three pages
    assert pool.stats().bytes == 3 * 4096
    for v in views[:8]:
        pool.release(v)
    pool.acquire(1)  # a poll: the released blocks are safe (nobody is attached)
    assert pool.trim() == 4096  # one page is wholly free; another has a block out
    s = pool.stats()
    assert (s.pages, s.trimmed_pages, s.bytes) == (2, 1, 2 * 4096)
    assert s.bytes_out + s.bytes_waiting + s.bytes_free == s.bytes


def test_pages_that_stay_free_are_trimmed_by_the_pool(domain: qsbr.Domain) -> None:
    pool = qsbr.BufferPool((1024,), page_size=4096, domain=domain, trim_after=0.05)
    views = [pool.acquire(1000) for _ in range(8)]
    for v in views:
        pool.release(v)
    pool.acquire(1)  # collects them
    time.sleep(0.1)
    assert wait_until(lambda: (pool.release(pool.acquire(5000)), pool.stats().trimmed_pages >= 1)[1])


def test_stats_after_close() -> None:
    """shared/repros/pipeline/stats_after_close.py raised a bare KeyError."""
    pool = qsbr.BufferPool()
    pool.release(pool.acquire(100))
    pool.close()
    s = pool.stats()
    assert s.closed and s.pages == 0 and s.bytes == 0
    assert qsbr.BufferPool().stats().bytes == 0


def test_pool_page_changes_class_only_after_a_grace_period(domain: qsbr.Domain, worker: Worker) -> None:
    pool = qsbr.BufferPool((256, 512), page_size=1024, max_bytes=1024, domain=domain, on_full="raise")
    worker.call(domain.register)
    v = pool.acquire(200)
    pool.release(v)
    with pytest.raises(MemoryError):
        pool.acquire(500)  # the one page still serves 256 and is not safe yet
    worker.call(domain.quiescent)  # after that acquire's poll advanced to the goal
    w = pool.acquire(500)  # now the page may be re-carved into 512-byte blocks
    assert len(w) == 500
    st = pool.stats().classes
    assert (st[512].in_use, st[256].free, st[256].waiting) == (1, 0, 0)
    worker.call(domain.unregister)


def test_pool_under_threads_never_hands_out_a_block_in_use(domain: qsbr.Domain) -> None:
    """Producers fill blocks with a tag and hand views (whole blocks and
    frames) to consumers through a queue; consumers check the tag, release,
    quiesce. A block reused under a consumer would show another tag."""
    pool = qsbr.BufferPool((64, 256), page_size=4096, domain=domain)
    q: queue.Queue[tuple[int, memoryview] | None] = queue.Queue(maxsize=64)

    def producer(base: int) -> None:
        for k in range(1000):
            tag = (base + k) & 0xFF
            v = pool.acquire(64 if k % 2 else 200)
            v[:] = bytes([tag]) * len(v)
            if k % 3 == 0:  # two frames of one block
                half = len(v) // 2
                a, b = pool.slice(v, 0, half), pool.slice(v, half, len(v))
                pool.release(v)
                q.put((tag, a), timeout=STEP_TIMEOUT)
                q.put((tag, b), timeout=STEP_TIMEOUT)
            else:
                q.put((tag, v), timeout=STEP_TIMEOUT)

    def consumer() -> None:
        with domain.registered():
            while True:
                item = q.get(timeout=STEP_TIMEOUT)
                if item is None:
                    return
                tag, v = item
                assert bytes(v) == bytes([tag]) * len(v), f"block changed under its reader (tag {tag})"
                pool.release(v)
                # Still ours until the quiescent state: check once more.
                assert bytes(v) == bytes([tag]) * len(v), f"block reused before a grace period (tag {tag})"
                domain.quiescent()

    def producers_then_stop() -> None:
        try:
            run_threads(lambda: producer(0), lambda: producer(77), timeout=60)
        finally:
            for _ in range(2):
                q.put(None, timeout=STEP_TIMEOUT)

    run_threads(consumer, consumer, producers_then_stop, timeout=90)
    st = pool.stats()
    assert sum(c.in_use for c in st.classes.values()) == 0 and st.bytes_out == 0


def test_views_dropped_by_many_threads_leave_pages_sound(domain: qsbr.Domain) -> None:
    """shared/repros/pipeline/pool_export_race.py: views made and dropped by
    several threads at once. The pages keep no export count (ctypes), so
    dropping them later says nothing about 'exported buffers'."""
    pool = qsbr.BufferPool((64,), domain=domain)

    def worker() -> None:
        with domain.registered():
            for i in range(5000):
                v = pool.acquire(64)
                w = v[1:9]
                pool.release(v)
                del v, w
                if i % 16 == 0:
                    domain.quiescent()

    run_threads(worker, worker, timeout=60)
    pool.close()  # drops the pages
    gc.collect()


class _CountingPages(PageSet):
    """Checks, under the pool's lock, that a block goes back once per time
    it was taken: never twice, never one that is not out."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.out_blocks: set[int] = set()
        self.given_back = 0

    def take(self, size: int, carve: bool) -> Block | None:
        block = super().take(size, carve)
        if block is not None:
            assert id(block) not in self.out_blocks, "a block handed out twice"
            self.out_blocks.add(id(block))
        return block

    def retire(self, block: Block) -> None:
        assert id(block) in self.out_blocks, "a block given back twice, or one that was not out"
        self.out_blocks.discard(id(block))
        self.given_back += 1
        super().retire(block)


class _CountingPool(qsbr.BufferPool):
    _pages_class = _CountingPages


def test_frames_released_by_many_threads_give_each_block_back_once(domain: qsbr.Domain) -> None:
    """slice() and release() take no lock (outside debug mode): frames of
    one block, released by three threads at once while the producer
    releases the block's own view, give the block back exactly once, and
    only after its last frame."""
    pool = _CountingPool((4096,), page_size=1 << 16, domain=domain)
    pages = pool._p
    assert isinstance(pages, _CountingPages)
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
    assert pages.given_back == blocks and not pages.out_blocks
    st = pool.stats()
    assert st.bytes_out == 0 and st.classes[4096].in_use == 0


class _ReleaseOnInsert(dict):  # type: ignore[type-arg]
    """An ``_out`` shard that runs ``hook`` at its next insertion: the point
    of slice() where another thread's release of the source view would race."""

    hook: Callable[[], None] | None = None

    def __setitem__(self, key: Any, value: Any) -> None:
        hook, _ReleaseOnInsert.hook = _ReleaseOnInsert.hook, None
        super().__setitem__(key, value)
        if hook is not None:
            hook()


def test_a_slice_racing_the_release_of_its_view_is_refused_and_the_block_goes_back_once(
    domain: qsbr.Domain,
) -> None:
    if domain.debug:
        pytest.skip("debug mode orders slice() and release() with the pool's lock")
    pool = _CountingPool((256,), page_size=4096, domain=domain)
    pages = pool._p
    assert isinstance(pages, _CountingPages)
    view = pool.acquire(256)
    pool._out = [_ReleaseOnInsert(shard) for shard in pool._out]
    _ReleaseOnInsert.hook = lambda: pool.release(view)  # released between the token and the check
    with pytest.raises(ValueError, match="not out"):
        pool.slice(view, 0, 16)
    assert pages.given_back == 1 and not pages.out_blocks
    assert not any(pool._out), "the refused slice stayed out"
    with pytest.raises(ValueError, match="not out"):
        pool.release(view)
    assert pages.given_back == 1


def test_a_pending_grace_period_costs_one_poll_per_batch_of_acquires_not_one_each(
    domain: qsbr.Domain, worker: Worker
) -> None:
    """A reader inside its read holds every released block back. acquire()
    then carves fresh blocks, and polls the domain once per POLL_AFTER
    blocks that wait, not once per acquire (each failing poll advances and
    scans)."""
    worker.call(domain.register)  # attached, and never quiescent below
    pool = qsbr.BufferPool((64,), page_size=1 << 16, domain=domain)
    polls_before = domain.stats().polls
    for _ in range(10 * POLL_AFTER):
        pool.release(pool.acquire(64))
    polls = domain.stats().polls - polls_before
    if not domain.debug:  # (debug pools also retire each block to the domain, which polls on its own)
        assert 1 <= polls <= 10, f"{polls} polls for {10 * POLL_AFTER} acquires"
    assert pool.stats().classes[64].waiting == 10 * POLL_AFTER  # nothing reused under the reader
    worker.call(domain.unregister)  # the read is over
    assert domain.synchronize(timeout=STEP_TIMEOUT)
    pool.release(pool.acquire(64))  # reuses a block: they are all safe now
    st = pool.stats().classes[64]
    assert st.waiting <= 1 and st.free >= 10 * POLL_AFTER - 1
