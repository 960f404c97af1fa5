"""BufferPool: zero-copy blocks reused only after a grace period
(docs/api.md, "qsbr.BufferPool"). Every test runs under both rd_seq
strategies."""

from __future__ import annotations

import queue

import pytest

import qsbr
from helpers import STEP_TIMEOUT, Worker, run_threads

#: Run every test here with the domain in debug mode too (conftest.py).
DEBUG_TOO = True


def test_pool_acquire_sizes_and_errors(domain: qsbr.Domain) -> None:
    pool = qsbr.BufferPool(domain=domain)
    v = pool.acquire(100)
    assert len(v) == 100 and not v.readonly
    st = pool.stats().classes
    assert st[256].in_use == 1 and st[64].in_use == 0
    assert pool.stats()["pages"] == pool.stats().pages == 1
    assert set(pool.stats().as_dict()["classes"]) == {64, 256, 1024, 4096, 16384, 65536}
    assert len(pool.acquire(65536)) == 65536
    with pytest.raises(TypeError, match="int number of bytes"):
        pool.acquire(1.5)  # type: ignore[arg-type]
    for bad in (0, -1, 65537):
        with pytest.raises(ValueError, match="sizes must be in 1..65536"):
            pool.acquire(bad)
    with pytest.raises(ValueError, match="released already, or it did not come from this pool"):
        pool.release(memoryview(bytearray(100)))
    with pytest.raises(ValueError, match="not a slice"):
        pool.release(v[:10])
    pool.release(v)
    with pytest.raises(ValueError, match="released already"):
        pool.release(v)
    for kwargs in ({"size_classes": ()}, {"size_classes": (0,)}, {"page_size": 0}, {"max_bytes": 10}):
        with pytest.raises(ValueError):
            qsbr.BufferPool(**kwargs)  # type: ignore[arg-type]
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        pool.acquire(10)


def test_pool_reuses_a_block_only_after_a_grace_period(domain: qsbr.Domain, worker: Worker) -> None:
    pool = qsbr.BufferPool((256,), page_size=1024, max_bytes=2048, debug=True, domain=domain)
    worker.call(domain.register)  # a reader that holds the view below
    v = pool.acquire(256)
    v[:] = b"\x07" * 256
    reader_view = worker.call(lambda: v[:])  # the reader's own slice of the block
    pool.release(v)
    others = [pool.acquire(256) for _ in range(7)]  # the other 7 blocks of 2 pages
    for o in others:
        o[:] = b"\xff" * 256
    assert bytes(reader_view) == b"\x07" * 256  # untouched: not reused
    with pytest.raises(MemoryError, match="max_bytes=2,048"):
        pool.acquire(256)  # only the waiting block is left, and it is not safe
    assert pool.stats().classes[256].waiting == 1
    worker.call(domain.quiescent)  # the reader is done with it
    again = pool.acquire(256)
    assert bytes(reader_view) == bytes([qsbr.buffer_pool.POISON]) * 256  # same block, poisoned when safe
    assert bytes(again) == bytes(reader_view)
    worker.call(domain.unregister)


def test_pool_page_changes_class_only_after_a_grace_period(domain: qsbr.Domain, worker: Worker) -> None:
    pool = qsbr.BufferPool((256, 512), page_size=1024, max_bytes=1024, domain=domain)
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
    """Producers fill blocks with a tag and hand views to consumers through
    a queue; consumers check the tag, release, quiesce. A block reused under
    a consumer would show another tag."""
    pool = qsbr.BufferPool((64, 256), page_size=4096, domain=domain)
    q: queue.Queue[tuple[int, memoryview] | None] = queue.Queue(maxsize=64)

    def producer(base: int) -> None:
        for k in range(2000):
            tag = (base + k) & 0xFF
            v = pool.acquire(64 if k % 2 else 200)
            v[:] = bytes([tag]) * len(v)
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
    assert sum(c.in_use for c in st.classes.values()) == 0
